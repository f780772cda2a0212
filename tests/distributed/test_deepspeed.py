"""DeepSpeed ZeRO-2 over 2 CPU processes (DeepSpeed's CPU accelerator, gloo): the run completes, its
loss falls as in the single-process run, and its per-process checkpoints resume."""

import pytest

from tests.distributed.conftest import single_process_losses

pytest.importorskip("deepspeed")


def test_deepspeed_zero2_matches_single_process_and_resumes(tmp_path, run_two_processes):
    one = single_process_losses(tmp_path)
    two = run_two_processes("deepspeed")
    assert two[4] < two[1]
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, rel=1e-5), (step, one, two)
    checkpoint = tmp_path / "deepspeed" / "checkpoints" / "step-0000004"
    assert {p.name for p in checkpoint.glob("optimizer-rank*.pt")} == {"optimizer-rank0.pt", "optimizer-rank1.pt"}
