"""FSDP2 (`fully_shard`) over 2 CPU processes: the same losses as one process on the same global batch,
a sharded torch.distributed.checkpoint that resumes exactly, and a gathered `final/` model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.conftest import GALORE, STEPS


def test_fsdp_matches_single_process_and_resumes(single_process, two_processes_resumed):
    single = single_process()
    # memory reports from the resumed launch only (the first launch tracks its step but writes none)
    two = two_processes_resumed("fsdp", "memory.track_steps=1", first=("memory.report=false",))
    one = single.losses
    assert sorted(two.losses) == list(range(1, STEPS + 1))
    for step, loss in one.items():
        assert two.losses[step] == pytest.approx(loss, rel=1e-5), (step, one, two.losses)
    checkpoint = two.out / "checkpoints" / f"step-{STEPS:07d}"
    assert (checkpoint / "sharded" / ".metadata").is_file() and (checkpoint / "rng-rank1.pt").is_file()
    # final/ holds the whole model, gathered from the shards: equal to the single-process result.
    full = load_file(two.out / "final" / "model.safetensors")
    reference = load_file(single.out / "final" / "model.safetensors")
    assert full.keys() == reference.keys()
    for name in reference:
        # Adam divides by sqrt(v): near-zero gradient entries amplify reduction-order differences.
        torch.testing.assert_close(full[name], reference[name], rtol=1e-3, atol=1e-4)
    # `memft export` reads the sharded checkpoint in one process: the same model as final/ (the last step)
    from memft.train.export import export

    export(checkpoint, two.out.parent / "exported")
    exported = load_file(two.out.parent / "exported" / "model.safetensors")
    assert exported.keys() == full.keys() and all(torch.equal(exported[n], full[n]) for n in full)
    # every process reports its own memory (tracked exactly on its shards)
    rank0 = json.loads((two.out / "memory.json").read_text())
    rank1 = json.loads((two.out / "memory-rank1.json").read_text())
    assert rank1["meta"]["process"] == 1 and rank0["peak_bytes"] > 0 and rank1["peak_bytes"] > 0
    # each holds half of the fp32 AdamW state (2 moments of the 0.9M parameters, sharded by rows)
    params = sum(t.numel() for t in reference.values())
    for report in (rank0, rank1):
        assert report["end_breakdown"]["optimizer_state"] == pytest.approx(8 * params / 2, rel=0.02)


def test_fsdp_galore_matches_single_process_and_resumes(single_process, two_processes_resumed):
    """GaLore steps FSDP2's row shards by gathering each matrix: the subspace computed at step 0 comes
    from the whole averaged gradient, so the run equals one process on the whole batch, across a resume
    after step 1 from the sharded checkpoint (which holds the projector and the low-rank moments)."""
    one = single_process(*GALORE).losses
    two = two_processes_resumed("fsdp", *GALORE).losses
    assert sorted(two) == list(range(1, STEPS + 1))
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, rel=1e-5), (step, one, two)
