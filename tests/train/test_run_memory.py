"""RunMemory, the memory policy of memft's loop and Hugging Face callback: the first steps tracked exactly,
interval and run figures, peaks restarting per interval (or never, for the CUDA peak statistics), the report.
CUDA peaks are checked on a fake allocator everywhere and on a real GPU where there is one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memft.memory import CATEGORIES, MemoryTracker
from memft.train.run_memory import RunMemory
from tests.conftest import FakeAllocator


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _step(model, optimizer, batch_size=16):
    device = next(model.parameters()).device
    model(torch.randn(batch_size, 8, device=device)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _train(memory, model, optimizer, steps, batch_sizes=None):
    """``steps`` measured steps, each logged as its own interval; returns the interval figures."""
    intervals = []
    for step in range(steps):
        with memory.measuring():
            _step(model, optimizer, batch_sizes[step] if batch_sizes else 16)
        intervals.append(memory.interval())
    return intervals


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_first_steps_are_tracked_and_reported_per_interval_and_for_the_run():
    model, optimizer = _setup()
    memory = RunMemory(model, optimizer, "cpu", track_steps=2)
    intervals = _train(memory, model, optimizer, 3, batch_sizes=[16, 256, 16])
    assert memory.tracked_steps == 2
    first, second, third = intervals
    for figures in (first, second):
        assert sum(figures[f"tracked_peak_{c}_bytes"] for c in CATEGORIES) == figures["tracked_peak_bytes"]
        assert figures["tracked_peak_parameters_bytes"] == _param_bytes(model)
    assert second["tracked_peak_bytes"] > first["tracked_peak_bytes"]  # a larger batch
    assert third == {}  # untracked, and no CUDA
    run = memory.run()
    assert run["tracked_steps"] == 2
    assert run["run_tracked_peak_bytes"] == second["tracked_peak_bytes"]
    assert all(run[f"run_tracked_peak_{c}_bytes"] == second[f"tracked_peak_{c}_bytes"] for c in CATEGORIES)
    assert memory.peak_bytes() == run["run_tracked_peak_bytes"]


def test_peaks_restart_per_interval_off_cuda_even_when_asked_not_to():
    model, optimizer = _setup()
    memory = RunMemory(model, optimizer, "cpu", track_steps=2, restart_peaks=False)
    first, second = _train(memory, model, optimizer, 2, batch_sizes=[256, 16])
    assert second["tracked_peak_bytes"] < first["tracked_peak_bytes"]
    assert memory.tracker.interval_peaks == [first["tracked_peak_bytes"], second["tracked_peak_bytes"]]


def test_report_holds_the_tracked_steps_and_the_callers_meta():
    model, optimizer = _setup()
    memory = RunMemory(model, optimizer, "cpu", track_steps=3)
    assert memory.report("run") is None  # nothing tracked yet
    _train(memory, model, optimizer, 2)
    report = memory.report("my-run", {"model": "mlp", "batch_size": 16})
    assert report.name == "my-run" and report.source == "tracked"
    assert report.meta == {"architecture": "Sequential", "parameters": 420, "model": "mlp", "batch_size": 16,
                           "tracked_steps": 2}
    assert report.peak_bytes == memory.run()["run_tracked_peak_bytes"]
    assert report.breakdown["optimizer_state"] > 0


def test_without_tracking_there_is_no_tracked_figure():
    model, optimizer = _setup()
    memory = RunMemory(model, optimizer, "cpu", track_steps=0)
    assert _train(memory, model, optimizer, 1) == [{}]
    assert memory.run() == {} and memory.report() is None and memory.peak_bytes() is None


def test_a_step_stopped_midway_leaves_the_tracker_and_is_not_counted():
    model, optimizer = _setup()
    memory = RunMemory(model, optimizer, "cpu", track_steps=2)
    with pytest.raises(RuntimeError, match="stopped"), memory.measuring():
        model(torch.randn(4, 8)).sum().backward()
        raise RuntimeError("stopped")
    assert memory.tracked_steps == 0
    left_at = memory.tracker.current_bytes
    kept = model(torch.randn(64, 8))
    assert memory.tracker.current_bytes == left_at and kept.numel()  # no longer tracking
    memory.end_step()  # after close(): nothing to end
    memory.close()
    assert memory.tracked_steps == 0
    memory.begin_step()
    memory.begin_step()  # already inside a tracked step
    _step(model, optimizer)
    memory.end_step()
    assert memory.tracked_steps == 1 and memory.run()["tracked_steps"] == 1


@pytest.fixture
def allocator(monkeypatch):
    """A fake CUDA allocator; the tracker (on a CPU model) resets its peaks in reset_peak, as on CUDA."""
    fake = FakeAllocator()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("max_memory_allocated", "max_memory_reserved", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    reset_peak = MemoryTracker.reset_peak

    def reset_peak_and_cuda(self):
        reset_peak(self)
        fake.reset_peak_memory_stats()

    monkeypatch.setattr(MemoryTracker, "reset_peak", reset_peak_and_cuda)
    return fake


def _fake_cuda_run(allocator, restart_peaks):
    model, optimizer = _setup()
    memory = RunMemory(model, optimizer, "cuda", track_steps=1, restart_peaks=restart_peaks)
    intervals = []
    for nbytes in (500, 300, 200):
        with memory.measuring():
            _step(model, optimizer)
            allocator.allocate(nbytes)
        assert memory.peak_bytes() == allocator.peak
        intervals.append(memory.interval())
    return memory, intervals


def test_cuda_peaks_restart_per_interval_and_the_run_keeps_their_maximum(allocator):
    memory, intervals = _fake_cuda_run(allocator, restart_peaks=True)
    # read before the tracker's reset_peak, which restarts the CUDA peaks too
    assert [i["cuda_peak_allocated_bytes"] for i in intervals] == [500, 300, 200]
    assert [i["cuda_peak_reserved_bytes"] for i in intervals] == [1012, 812, 712]
    assert "tracked_peak_bytes" in intervals[0] and "tracked_peak_bytes" not in intervals[1]
    allocator.allocate(100)  # the current interval counts in the run figures
    run = memory.run()
    assert run["run_cuda_peak_allocated_bytes"] == 500 and run["run_cuda_peak_reserved_bytes"] == 1012
    assert run["tracked_steps"] == 1


def test_cuda_peaks_never_reset_without_restart(allocator):
    memory, intervals = _fake_cuda_run(allocator, restart_peaks=False)
    assert allocator.resets == 0
    assert not any("cuda" in key for figures in intervals for key in figures)
    assert "tracked_peak_bytes" in intervals[0]
    assert memory.tracker.interval_peaks == []  # tracked peaks cover every tracked step
    run = memory.run()
    assert run["run_cuda_peak_allocated_bytes"] == 500 and run["run_cuda_peak_reserved_bytes"] == 1012


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_figures_on_a_gpu():
    model, _ = _setup()
    model = model.cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    memory = RunMemory(model, optimizer, "cuda", track_steps=1)
    large, small = _train(memory, model, optimizer, 2, batch_sizes=[8192, 16])
    assert large["cuda_peak_allocated_bytes"] >= large["tracked_peak_bytes"] > 0
    assert large["cuda_peak_reserved_bytes"] >= large["cuda_peak_allocated_bytes"]
    assert small["cuda_peak_allocated_bytes"] < large["cuda_peak_allocated_bytes"]
    run = memory.run()
    assert run["run_cuda_peak_allocated_bytes"] == large["cuda_peak_allocated_bytes"]
    assert run["run_tracked_peak_bytes"] == large["tracked_peak_bytes"]
