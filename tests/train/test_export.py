"""`memft export`: any checkpoint becomes a directory Hugging Face loads, with the weights the run had at
that step; `final/` is written by the same code."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from memft.train.models import resolve_model_path
from tests.conftest import tiny_recipe, write_recipe


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_a_checkpoint_exports_to_a_loadable_model(tmp_path, cli, adapter, single_thread):
    sections = {"train": {"max_steps": 4, "save_every": 2, "keep_checkpoints": 3}, "memory": {"track_steps": 0}}
    if adapter:
        sections["adapter"] = {"name": "lora", "r": 4}
    out = tmp_path / "run"
    code, _, err = cli("finetune", write_recipe(tmp_path / "r.yaml", tiny_recipe(out, **sections)))
    assert code == 0, err
    step2 = out / "checkpoints" / "step-0000002"
    code, stdout, err = cli("export", step2, tmp_path / "exported")
    assert code == 0 and "Exported" in stdout, err
    trained = load_file(step2 / "trainable.safetensors")
    if adapter:
        config = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "memft:tiny-llama"  # as the recipe wrote it
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path("memft:tiny-llama"))
        model = PeftModel.from_pretrained(base, tmp_path / "exported")
    else:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    params = dict(model.named_parameters())
    for name, tensor in trained.items():
        assert torch.equal(params[name].detach(), tensor), name
    assert (tmp_path / "exported" / "tokenizer_config.json").is_file()
    # the run directory means its newest intact checkpoint; an existing directory is never replaced
    code, stdout, _ = cli("export", out, tmp_path / "latest")
    assert code == 0 and "step-0000004" in stdout
    code, _, err = cli("export", out, tmp_path / "latest")
    assert code == 2 and "not empty" in err
    (tmp_path / ".tmp-other").mkdir()  # the staging name of DEST 'other' is someone else's: left alone
    code, _, err = cli("export", out, tmp_path / "other")
    assert code == 2 and "Move it away" in err and (tmp_path / ".tmp-other").is_dir()


def test_a_damaged_checkpoint_is_refused(tmp_path, cli, single_thread):
    out = tmp_path / "run"
    cli("finetune", write_recipe(tmp_path / "r.yaml", tiny_recipe(out, train={"max_steps": 2},
                                                                  memory={"track_steps": 0})))
    ckpt = out / "checkpoints" / "step-0000002"
    with open(ckpt / "trainable.safetensors", "r+b") as handle:
        handle.truncate(100)
    code, _, err = cli("export", ckpt, tmp_path / "x")
    assert code == 2 and "not an intact memft checkpoint" in err and "trainable.safetensors" in err
    code, _, err = cli("export", tmp_path / "nothing", tmp_path / "x")
    assert code == 2 and "neither a memft run directory nor a checkpoint" in err
