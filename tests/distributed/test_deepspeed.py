"""DeepSpeed ZeRO-2 over 2 CPU processes (DeepSpeed's CPU accelerator, gloo): the run completes, its
loss falls as in the single-process run, and its per-process checkpoints resume."""

import pytest

from tests.distributed.conftest import STEPS

pytest.importorskip("deepspeed")


def test_deepspeed_zero2_matches_single_process_and_resumes(single_process, two_processes_resumed):
    one = single_process().losses
    two = two_processes_resumed("deepspeed")
    losses = two.losses
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1]
    for step, loss in one.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), (step, one, losses)
    checkpoint = two.out / "checkpoints" / f"step-{STEPS:07d}"
    assert {p.name for p in checkpoint.glob("optimizer-rank*.pt")} == {"optimizer-rank0.pt", "optimizer-rank1.pt"}
