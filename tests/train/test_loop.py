import json
import math

import pytest
import torch

from memft.errors import RunError
from memft.train.loop import Trainer, finetune
from memft.train.recipe import validate_recipe
from tests.conftest import crash_and_resume, tiny_recipe


def reloaded_params(path):
    from transformers import AutoModelForCausalLM
    return list(AutoModelForCausalLM.from_pretrained(path).parameters())


def _run(recipe: dict, **kw):
    return finetune(validate_recipe(recipe), **kw)


def test_tiny_run_lowers_loss_and_writes_outputs(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", train={"max_steps": 20, "log_every": 5})
    result = _run(recipe)
    assert len(result.losses) == 20
    assert sum(result.losses[-3:]) / 3 < 0.6 * result.losses[0]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [5, 10, 15, 20]
    assert "eval_loss" in lines[-1] and math.isfinite(lines[-1]["eval_perplexity"])
    memory = json.loads((tmp_path / "run" / "memory.json").read_text())
    params = sum(p.numel() * p.element_size() for p in reloaded_params(tmp_path / "run" / "final"))
    assert memory["breakdown"]["parameters"] == params          # fp32 weights, counted exactly
    assert memory["peak_bytes"] > params and (tmp_path / "run" / "memory.png").stat().st_size > 0
    assert result.peak_bytes == memory["peak_bytes"]

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    reloaded = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").named_parameters())
    last = load_file(tmp_path / "run" / "checkpoints" / "step-0000020" / "trainable.safetensors")
    assert last and all(torch.equal(reloaded[name], tensor) for name, tensor in last.items())
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "step-0000020" / "optimizer.pt", weights_only=True)
    assert len(ckpt["state"]) == len(last)


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    # The run dies during step 7; its latest checkpoint is step 4, and resuming reproduces steps 5..10.
    full, resumed = crash_and_resume(tmp_path, 6, train={"max_steps": 10, "save_every": 4, "grad_accum": 2})
    assert resumed == full[4:]


def test_lora_run_saves_a_peft_adapter(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", adapter={"name": "lora", "r": 4, "alpha": 8},
                         optimizer={"lr": 1e-2}, train={"max_steps": 12},
                         data={"train": {"path": "memft:chat", "format": "chat", "max_examples": 100}})
    result = _run(recipe)
    assert result.losses[-1] < result.losses[0]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from memft.train.models import resolve_model_path
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("memft:tiny-llama"))
    model = PeftModel.from_pretrained(base, tmp_path / "run" / "final")
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_existing_run_is_refused_unless_resume_or_overwrite(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", train={"max_steps": 2})
    _run(recipe)
    with pytest.raises(RunError, match="already holds a run"):
        _run(recipe)
    changed = tiny_recipe(tmp_path / "run", train={"max_steps": 3}, optimizer={"lr": 1e-3})
    with pytest.raises(RunError, match=r"different recipe \(optimizer.lr changed\)"):
        _run(changed, resume=True)
    assert _run(recipe, overwrite=True).steps == 2


def test_foreign_or_unwritable_output_dirs(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(RunError, match="holds files memft did not write"):
        Trainer(validate_recipe(tiny_recipe(foreign)))
    assert (foreign / "thesis.tex").read_text() == "precious"
    with pytest.raises(RunError, match="no run to resume"):
        Trainer(validate_recipe(tiny_recipe(tmp_path / "new")), resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    recipe = validate_recipe(tiny_recipe(tmp_path / "run", train={"max_steps": 6, "save_every": 2}))
    trainer = Trainer(recipe)
    original = trainer.train_step
    calls = {"n": 0}

    def poisoned(micro):
        calls["n"] += 1
        if calls["n"] == 4:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))
        return original(micro)

    trainer.train_step = poisoned
    with pytest.raises(RunError, match="loss became nan at step 4"):
        trainer.run()
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-0000002"]


def test_interrupt_saves_a_checkpoint_and_resume_finishes(tmp_path):
    recipe = validate_recipe(tiny_recipe(tmp_path / "run", train={"max_steps": 6}))
    trainer = Trainer(recipe)
    original = trainer.train_step

    def interrupted(micro):
        loss = original(micro)
        if trainer.step == 2:  # Ctrl-C arrives during step 3
            trainer._request_stop(None, None)
        return loss

    trainer.train_step = interrupted
    result = trainer.run()
    assert result.interrupted and result.steps == 3
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-0000003"
    finished = finetune(recipe, resume=True)
    assert finished.steps == 6 and not finished.interrupted
