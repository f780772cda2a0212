"""The memory figures of one training run, as ``memft finetune`` and the Hugging Face callback record them.

- Exact tensor storage by category (:class:`memft.memory.MemoryTracker`: parameters, gradients, optimizer
  state, activations, temporaries, other) over the first ``track_steps`` optimizer steps. A tracked step runs
  from ``begin_step()`` (before its first forward) to ``end_step()`` (after the optimizer step), so the first
  one includes the first allocation of the optimizer state. Exact accounting intercepts every op and is slow,
  hence only the first steps.
- On CUDA, the allocator's peaks for every step: ``max_memory_allocated`` (what tensors occupied) and
  ``max_memory_reserved`` (what the caching allocator held, the number that decides an out-of-memory error).

Figures are dicts of bytes (callers add their own prefix):

    interval(): tracked_peak_bytes, tracked_peak_<category>_bytes       (a tracked step fell in the interval)
                cuda_peak_allocated_bytes, cuda_peak_reserved_bytes     (CUDA)
    run():      run_tracked_peak_bytes, run_tracked_peak_<category>_bytes, tracked_steps   (a step was tracked)
                run_cuda_peak_allocated_bytes, run_cuda_peak_reserved_bytes                (CUDA)

Each ``interval()`` restarts the peaks for the next interval. With ``restart_peaks=False`` (for a caller whose
own figures read the CUDA peak since training began, such as the Trainer's ``skip_memory_metrics=False``) the
CUDA peak statistics are never reset: intervals carry no CUDA peaks, and tracked peaks cover every tracked
step so far (the tracker's ``reset_peak`` would reset the CUDA peaks too). Either way the tracker resets the
CUDA peaks once, when its first step begins.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from memft.memory import MemoryReport, MemoryTracker

__all__ = ["RunMemory"]


class RunMemory:
    """Track the first ``track_steps`` steps exactly and the CUDA peaks throughout; see the module docstring.

    Args:
        model, optimizer: what the tracker categorises (parameters, ``.grad``, optimizer state).
        device: the training device; CUDA peaks are read on a CUDA device.
        track_steps: optimizer steps accounted exactly from the first ``begin_step()`` (0 disables it).
        restart_peaks: False never resets the CUDA peak statistics; off CUDA peaks always restart.
    """

    def __init__(self, model: nn.Module | None, optimizer: torch.optim.Optimizer | None, device: str | torch.device,
                 track_steps: int, restart_peaks: bool = True) -> None:
        device = torch.device(device)
        self._cuda = device if device.type == "cuda" and torch.cuda.is_available() else None
        self.restart_peaks = restart_peaks or self._cuda is None
        if self._cuda is not None and self.restart_peaks:
            torch.cuda.reset_peak_memory_stats(self._cuda)
        self.tracker = MemoryTracker(model=model, optimizer=optimizer) if track_steps else None
        self.tracked_steps = 0
        self._steps_left = track_steps
        self._active = False
        self._tracked_in_interval = 0
        self._cuda_run = {"allocated": 0, "reserved": 0}

    # ------------------------------------------------------------------------------------- steps
    def begin_step(self) -> None:
        """An optimizer step begins: tracked while tracked steps are left (no-op inside a tracked step)."""
        if self.tracker is not None and self._steps_left > 0 and not self._active:
            self.tracker.__enter__()
            self._active = True

    def end_step(self) -> None:
        """The optimizer step ended: a tracked step is counted."""
        if self._active:
            self.close()
            self._steps_left -= 1
            self._tracked_in_interval += 1
            self.tracked_steps += 1

    def close(self) -> None:
        """Leave the tracker if a step is being tracked, without counting it (training stopped inside a step)."""
        if self._active:
            self.tracker.__exit__(None, None, None)
            self._active = False

    @contextmanager
    def measuring(self) -> Iterator[None]:
        """``begin_step()`` and ``end_step()`` around one optimizer step; ``close()`` when it raises."""
        self.begin_step()
        try:
            yield
        except BaseException:
            self.close()
            raise
        self.end_step()

    # ----------------------------------------------------------------------------------- figures
    def _cuda_peaks(self) -> dict[str, int]:
        """The CUDA peaks since they last restarted, folded into the run's."""
        peaks = {"allocated": torch.cuda.max_memory_allocated(self._cuda),
                 "reserved": torch.cuda.max_memory_reserved(self._cuda)}
        for kind, nbytes in peaks.items():
            self._cuda_run[kind] = max(self._cuda_run[kind], nbytes)
        return peaks

    def interval(self) -> dict[str, int]:
        """Figures of the interval since the last call; then the peaks restart (unless ``restart_peaks`` is
        False). CUDA peaks are read first: the tracker's ``reset_peak`` also resets them."""
        figures: dict[str, int] = {}
        if self._cuda is not None:
            peaks = self._cuda_peaks()
            if self.restart_peaks:
                figures["cuda_peak_allocated_bytes"] = peaks["allocated"]
                figures["cuda_peak_reserved_bytes"] = peaks["reserved"]
        tracked = self._tracked_in_interval > 0
        if tracked:
            figures["tracked_peak_bytes"] = self.tracker.peak_bytes
            for category, nbytes in self.tracker.peak_breakdown.items():
                figures[f"tracked_peak_{category}_bytes"] = nbytes
        if self.restart_peaks:
            if tracked:
                self.tracker.reset_peak()  # on CUDA this also restarts the allocator's peaks
            if self._cuda is not None:
                torch.cuda.reset_peak_memory_stats(self._cuda)
        self._tracked_in_interval = 0
        return figures

    def run(self) -> dict[str, int]:
        """Figures of the run so far (the current interval included, nothing restarts)."""
        figures: dict[str, int] = {}
        if self.tracked_steps:
            figures["run_tracked_peak_bytes"] = self.tracker.run_peak_bytes
            for category, nbytes in self.tracker.run_peak_breakdown.items():
                figures[f"run_tracked_peak_{category}_bytes"] = nbytes
            figures["tracked_steps"] = self.tracked_steps
        if self._cuda is not None:
            self._cuda_peaks()
            figures["run_cuda_peak_allocated_bytes"] = self._cuda_run["allocated"]
            figures["run_cuda_peak_reserved_bytes"] = self._cuda_run["reserved"]
        return figures

    def peak_bytes(self) -> int | None:
        """For a progress bar: the CUDA allocated peak since the peaks last restarted, else the tracked run
        peak, else None."""
        if self._cuda is not None:
            return torch.cuda.max_memory_allocated(self._cuda)
        return self.tracker.run_peak_bytes if self.tracker is not None else None

    def report(self, name: str = "run", meta: dict[str, Any] | None = None) -> MemoryReport | None:
        """The tracked steps as a :class:`memft.memory.MemoryReport` (``meta`` added to its meta, with
        ``tracked_steps``), or None when no step was tracked."""
        if not self.tracked_steps:
            return None
        report = self.tracker.summary(name=name, source="tracked")
        report.meta.update(meta or {})
        report.meta["tracked_steps"] = self.tracked_steps
        return report
