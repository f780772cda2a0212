"""Damaged, foreign and hostile checkpoints, and a full disk while writing one."""

from __future__ import annotations

import errno
import shutil

import pytest
import torch

from memft.errors import RunError
from memft.train import checkpoint
from memft.train.loop import finetune
from memft.train.recipe import validate_recipe
from tests.conftest import crash, write_recipe
from tests.reliability.conftest import small_recipe, step_lines

STEPS = {"max_steps": 6, "save_every": 2, "keep_checkpoints": 3}


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """A run that died during step 5 (checkpoints at steps 2 and 4) and the uninterrupted run's metrics."""
    root = tmp_path_factory.mktemp("crashed")
    finetune(validate_recipe(small_recipe(root / "full", train=STEPS)))
    crash(small_recipe(root / "run", train=STEPS), after=4)
    return root


def _copy(crashed, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(crashed / "run", run)
    return run


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path):
    path.write_bytes(b"")


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _not_json(path):
    path.write_text('{"step": 4, "tokens_se')


@pytest.mark.parametrize("name, damage", [
    ("trainable.safetensors", _truncate), ("trainable.safetensors", _empty), ("optimizer.pt", _truncate),
    ("optimizer.pt", _flip_a_byte), ("scheduler.pt", _empty), ("rng.pt", _truncate), ("state.json", _not_json),
    ("manifest.json", _not_json),
])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_resumed(crashed, tmp_path, capsys, name, damage):
    run = _copy(crashed, tmp_path)
    damage(run / "checkpoints" / "step-0000004" / name)
    resumed = finetune(validate_recipe(small_recipe(run, train=STEPS)), resume=True)
    err = capsys.readouterr().err
    assert f"Checkpoint step-0000004 is damaged ({name}" in err
    assert "Resuming from step-0000002, the newest intact checkpoint." in err
    assert resumed.steps == 6 and step_lines(run) == step_lines(crashed / "full")


def test_no_intact_checkpoint_stops_with_the_damage_listed(crashed, tmp_path):
    run = _copy(crashed, tmp_path)
    _truncate(run / "checkpoints" / "step-0000004" / "optimizer.pt")
    (run / "checkpoints" / "step-0000002" / "rng.pt").unlink()
    with pytest.raises(RunError, match=r"no checkpoint in .* is intact: Checkpoint step-0000004 is damaged "
                                       r"\(optimizer.pt has .* bytes, .* were written\)\. Checkpoint step-0000002 is "
                                       r"damaged \(rng.pt is missing\)"):
        finetune(validate_recipe(small_recipe(run, train=STEPS)), resume=True)


def test_an_explicit_damaged_checkpoint_is_refused(crashed, tmp_path):
    run = _copy(crashed, tmp_path)
    _flip_a_byte(run / "checkpoints" / "step-0000002" / "trainable.safetensors")
    with pytest.raises(RunError, match=r"is not an intact memft checkpoint \(trainable.safetensors does not match "
                                       "the checksum"):
        finetune(validate_recipe(small_recipe(run, train=STEPS)), resume=str(run / "checkpoints" / "step-0000002"))


def test_a_checkpoint_of_another_recipe_is_refused_naming_the_keys(tmp_path):
    lora = {"name": "lora", "r": 4, "alpha": 8}
    finetune(validate_recipe(small_recipe(tmp_path / "r4", adapter=lora, train={"max_steps": 2})))
    other = small_recipe(tmp_path / "r8", adapter={**lora, "r": 8}, train={"max_steps": 2})
    finetune(validate_recipe(other))
    with pytest.raises(RunError, match=r"written by a different recipe \(adapter.r changed\)"):
        finetune(validate_recipe(other), resume=str(tmp_path / "r4" / "checkpoints" / "step-0000002"))


def test_mismatched_shapes_are_named_before_anything_is_copied(tmp_path):
    model = torch.nn.Linear(4, 3)
    directory = tmp_path / "ckpt"
    directory.mkdir()
    checkpoint.save_trainable(torch.nn.Linear(4, 2), directory)
    before = model.weight.detach().clone()
    with pytest.raises(RunError, match=r"weight: checkpoint \[2, 4\], model \[3, 4\]"):
        checkpoint.load_trainable(model, directory)
    assert torch.equal(model.weight, before)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_malicious_optimizer_file_is_not_loaded(crashed, tmp_path, capsys):
    run = _copy(crashed, tmp_path)
    step = run / "checkpoints" / "step-0000004"
    torch.save({"state": {}, "param_groups": [], "payload": _Payload()}, step / "optimizer.pt")
    (step / checkpoint.MANIFEST).unlink()  # as if the checksums had been forged too
    with pytest.raises(RunError, match="is not a memft checkpoint file: it holds Python objects other than tensors"
                                       r".* so it was not loaded"):
        finetune(validate_recipe(small_recipe(run, train=STEPS)), resume=True)
    assert "this must never run" not in capsys.readouterr().out


def test_a_full_disk_while_checkpointing_keeps_the_earlier_checkpoints(tmp_path, cli, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", small_recipe(tmp_path / "run", train=STEPS))
    real_save = torch.save

    def disk_full_at_step_4(obj, path, *args, **kwargs):
        if ".tmp-step-0000004" in str(path):
            real_save(obj, path, *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    code, _, err = cli("finetune", recipe)
    assert code == 2 and "Traceback" not in err
    assert "Could not write the checkpoint of step 4" in err and "No space left on device" in err
    assert "the earlier checkpoints are intact (latest: step-0000002)" in err and "--resume" in err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step-0000002"]
    monkeypatch.setattr(torch, "save", real_save)
    code, _, err = cli("finetune", recipe, "--resume")
    assert code == 0, err
