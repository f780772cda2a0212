"""Memory figures of a Hugging Face ``Trainer`` run, reported through the Trainer's own logs.

:class:`MemftCallback` measures what memft's training loop measures:

- exact tensor storage by category (:class:`memft.memory.MemoryTracker`: parameters, gradients, optimizer state,
  activations, temporaries, other) over the first ``track_steps`` optimizer steps. Each tracked step runs from
  ``on_step_begin`` (before the window's first forward) to ``on_step_end`` (after ``optimizer.step``, the
  scheduler and ``zero_grad``), so it includes the first allocation of the optimizer state and holds the
  steady-state peak. Exact accounting intercepts every op and is slow, hence only the first steps.
- on CUDA, the allocator's peaks (``max_memory_allocated``: what tensors occupied; ``max_memory_reserved``:
  what the caching allocator held, the number that decides an out-of-memory error) for every step.

The figures go out with ``trainer.log(...)``, so every reporting integration (TensorBoard, W&B, ...) and every
callback's ``on_log`` receives them like the loss: at each logging step of the Trainer (keys below, bytes,
for the interval since the previous logging step), and for the whole run on the last step (or at
``on_train_end`` when training stopped early). Emitting from ``on_step_end`` keeps the Trainer's pending loss
log: ``trainer.log`` clears ``control.should_log``, which the callback restores.

    memory/tracked_peak_bytes, memory/tracked_peak_<category>_bytes     (intervals with tracked steps)
    memory/cuda_peak_allocated_bytes, memory/cuda_peak_reserved_bytes   (CUDA)
    memory/run_tracked_peak_bytes, memory/run_tracked_peak_<category>_bytes, memory/tracked_steps,
    memory/run_cuda_peak_allocated_bytes, memory/run_cuda_peak_reserved_bytes   (the run)

After training, ``callback.report()`` is the tracked steps' :class:`memft.memory.MemoryReport` (terminal table,
markdown, JSON, PNG), as ``memft finetune`` writes it.

The Trainer's own memory metrics (``TrainingArguments(skip_memory_metrics=False)``, ``train_mem_*``) read the
CUDA peak since ``train()`` began. While they are on in a CUDA run, the callback never resets the CUDA peak
statistics: it reports run peaks only (no per-interval CUDA keys), and tracked peaks cover all tracked steps so
far. The tracker resets the CUDA peak once, when its first step begins; between the start of ``train()`` and
that moment only the optimizer and data loader are set up, which allocate less than a training step.

Every process measures itself; the reporting integrations publish process 0's figures.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from memft.memory import MemoryReport, MemoryTracker

__all__ = ["MemftCallback"]


class MemftCallback(TrainerCallback):
    """Report memft's memory measurements into the Trainer's logs; see the module docstring.

    Args:
        trainer: the ``Trainer`` to log through (``MemftTrainer`` attaches itself; with a plain ``Trainer``:
            ``trainer.add_callback(MemftCallback(trainer))``).
        track_steps: optimizer steps accounted exactly from the start of ``train()`` (0 disables it).
        prefix: prefix of every key (``"memory/"`` groups them in TensorBoard and W&B).
    """

    def __init__(self, trainer: Any = None, track_steps: int = 3, prefix: str = "memory/") -> None:
        if isinstance(track_steps, bool) or not isinstance(track_steps, int) or track_steps < 0:
            raise ValueError(f"track_steps must be an int >= 0 (optimizer steps tracked exactly; 0 disables "
                             f"tracking), got {track_steps!r}.")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string such as 'memory/', got {type(prefix).__name__}.")
        self.trainer = trainer
        self.track_steps = track_steps
        self.prefix = prefix
        self.tracker: MemoryTracker | None = None
        self._reset()

    def attach(self, trainer: Any) -> None:
        """Log through ``trainer`` (done by MemftTrainer for its callbacks)."""
        self.trainer = trainer

    def _reset(self) -> None:
        self._active = False
        self._steps_left = self.track_steps
        self._tracked_in_interval = 0
        self._tracked_total = 0
        self._steps_in_interval = 0
        self._run_reported = False
        self._cuda_device: torch.device | None = None
        self._restart_peaks = True
        self._cuda_run = {"allocated": 0, "reserved": 0}

    # --------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.trainer is None:
            raise ValueError("MemftCallback needs the trainer to log through: create it as MemftCallback(trainer) and "
                             "add it with trainer.add_callback(...), or train with MemftTrainer, which attaches it.")
        self.close()
        self._reset()
        # The Trainer's own memory metrics read the CUDA peak since train() began: never reset it under them.
        skipped = getattr(getattr(self.trainer, "_memory_tracker", None), "skip_memory_metrics",
                          args.skip_memory_metrics)
        device = torch.device(args.device)
        self._restart_peaks = bool(skipped) or device.type != "cuda"
        if device.type == "cuda" and torch.cuda.is_available():
            self._cuda_device = device
            if self._restart_peaks:
                torch.cuda.reset_peak_memory_stats(device)
        self.tracker = MemoryTracker(model=model, optimizer=optimizer) if self.track_steps else None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.tracker is not None and self._steps_left > 0 and not self._active:
            self.tracker.__enter__()
            self._active = True

    def on_step_end(self, args, state, control, **kwargs):
        if self._active:
            self.close()
            self._steps_left -= 1
            self._tracked_in_interval += 1
            self._tracked_total += 1
        self._steps_in_interval += 1
        if control.should_training_stop:
            self._emit({**self._interval_logs(), **self._run_logs()}, control)
        elif control.should_log:
            self._emit(self._interval_logs(), control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_log and self._steps_in_interval:
            self._emit(self._interval_logs(), control)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
        if not self._run_reported:
            self._emit({**self._interval_logs(), **self._run_logs()}, control)

    def report(self, name: str = "run") -> MemoryReport | None:
        """The tracked steps as a :class:`memft.memory.MemoryReport` (``.print()``, ``.save(directory)`` writes
        JSON, markdown and a PNG), or None when no step was tracked."""
        if self.tracker is None or not self._tracked_total:
            return None
        report = self.tracker.summary(name=name, source="tracked")
        report.meta["tracked_steps"] = self._tracked_total
        return report

    def close(self) -> None:
        """Leave the tracker if a step is being tracked (training stopped inside a step)."""
        if self._active and self.tracker is not None:
            self.tracker.__exit__(None, None, None)
        self._active = False

    # ---------------------------------------------------------------------------------- figures
    def _emit(self, logs: dict[str, float], control) -> None:
        if not logs:
            return
        should_log = control.should_log
        self.trainer.log(logs)
        control.should_log = should_log  # trainer.log cleared it; the Trainer still has its loss to log

    def _interval_logs(self) -> dict[str, float]:
        """Figures of the interval since the last emission; then the peaks restart (unless the Trainer's own
        memory metrics are on). CUDA peaks are read first: the tracker's ``reset_peak`` also resets them."""
        logs: dict[str, float] = {}
        p = self.prefix
        if self._cuda_device is not None:
            allocated = torch.cuda.max_memory_allocated(self._cuda_device)
            reserved = torch.cuda.max_memory_reserved(self._cuda_device)
            self._cuda_run["allocated"] = max(self._cuda_run["allocated"], allocated)
            self._cuda_run["reserved"] = max(self._cuda_run["reserved"], reserved)
            if self._restart_peaks:
                logs[f"{p}cuda_peak_allocated_bytes"] = allocated
                logs[f"{p}cuda_peak_reserved_bytes"] = reserved
        tracked = bool(self._tracked_in_interval and self.tracker is not None)
        if tracked:
            logs[f"{p}tracked_peak_bytes"] = self.tracker.peak_bytes
            for category, nbytes in self.tracker.peak_breakdown.items():
                logs[f"{p}tracked_peak_{category}_bytes"] = nbytes
        if self._restart_peaks:
            if tracked:
                self.tracker.reset_peak()  # on CUDA this also restarts the allocator's peaks
            if self._cuda_device is not None:
                torch.cuda.reset_peak_memory_stats(self._cuda_device)
        self._tracked_in_interval = 0
        self._steps_in_interval = 0
        return logs

    def _run_logs(self) -> dict[str, float]:
        """Run figures; call right after ``_interval_logs`` so that the CUDA run peaks include the last interval."""
        self._run_reported = True
        logs: dict[str, float] = {}
        p = self.prefix
        if self._tracked_total and self.tracker is not None:
            logs[f"{p}run_tracked_peak_bytes"] = self.tracker.run_peak_bytes
            for category, nbytes in self.tracker.run_peak_breakdown.items():
                logs[f"{p}run_tracked_peak_{category}_bytes"] = nbytes
            logs[f"{p}tracked_steps"] = self._tracked_total
        if self._cuda_device is not None:
            logs[f"{p}run_cuda_peak_allocated_bytes"] = self._cuda_run["allocated"]
            logs[f"{p}run_cuda_peak_reserved_bytes"] = self._cuda_run["reserved"]
        return logs
