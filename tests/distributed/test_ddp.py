"""DDP over 2 CPU processes (gloo) reproduces the single-process run on the same global batch, and
resumes from its checkpoint."""

import pytest

from tests.distributed.conftest import GALORE, STEPS

MEZO = ("optimizer.name=mezo", "optimizer.lr=1e-3", "optimizer.eps=1e-2", "train.max_grad_norm=null")


def test_ddp_galore_matches_single_process_and_resumes(single_process, two_processes_resumed):
    """GaLore projects the all-reduced gradient: the subspace computed at step 0 comes from the global
    gradient on every process, so the run equals one process on the whole batch, across a resume after
    step 1 (which restores the projector and the low-rank moments)."""
    one = single_process(*GALORE).losses
    two = two_processes_resumed("ddp", *GALORE).losses
    assert sorted(two) == list(range(1, STEPS + 1))
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, rel=1e-5), (step, one, two)


def test_ddp_mezo_matches_single_process(single_process, two_processes):
    """Same seed on every process, one scalar all-reduce per forward: the same update as one process."""
    one = single_process(*MEZO).losses
    two = two_processes("ddp", *MEZO).losses
    assert sorted(two) == list(range(1, STEPS + 1))
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, rel=1e-5), (step, one, two)
