"""Memory figures of a Hugging Face ``Trainer`` run, reported through the Trainer's own logs.

:class:`MemftCallback` applies memft's memory policy (:class:`memft.train.run_memory.RunMemory`, the one
``memft finetune`` uses):

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

from transformers import TrainerCallback

from memft.memory import MemoryReport
from memft.train.run_memory import RunMemory

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
        self.memory: RunMemory | None = None  # the run's memory policy, from on_train_begin
        self._steps_in_interval = 0
        self._run_reported = False

    def attach(self, trainer: Any) -> None:
        """Log through ``trainer`` (done by MemftTrainer for its callbacks)."""
        self.trainer = trainer

    # --------------------------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.trainer is None:
            raise ValueError("MemftCallback needs the trainer to log through: create it as MemftCallback(trainer) and "
                             "add it with trainer.add_callback(...), or train with MemftTrainer, which attaches it.")
        self.close()
        self._steps_in_interval = 0
        self._run_reported = False
        # The Trainer's own memory metrics read the CUDA peak since train() began: never reset it under them.
        skipped = getattr(getattr(self.trainer, "_memory_tracker", None), "skip_memory_metrics",
                          args.skip_memory_metrics)
        self.memory = RunMemory(model, optimizer, args.device, self.track_steps, restart_peaks=bool(skipped))

    def on_step_begin(self, args, state, control, **kwargs):
        if self.memory is not None:
            self.memory.begin_step()

    def on_step_end(self, args, state, control, **kwargs):
        if self.memory is None:
            return
        self.memory.end_step()
        self._steps_in_interval += 1
        if control.should_training_stop:
            self._log(control, run=True)
        elif control.should_log:
            self._log(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_log and self._steps_in_interval:
            self._log(control)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
        if self.memory is not None and not self._run_reported:
            self._log(control, run=True)

    def report(self, name: str = "run") -> MemoryReport | None:
        """The tracked steps as a :class:`memft.memory.MemoryReport` (``.print()``, ``.save(directory)`` writes
        JSON, markdown and a PNG), or None when no step was tracked."""
        return self.memory.report(name) if self.memory is not None else None

    def close(self) -> None:
        """Leave the tracker if a step is being tracked (training stopped inside a step)."""
        if self.memory is not None:
            self.memory.close()

    def _log(self, control, run: bool = False) -> None:
        """Log the interval's figures (with ``run``, the run's too) through the trainer. Logging from
        ``on_step_end`` keeps the Trainer's pending loss log: ``trainer.log`` clears ``control.should_log``."""
        figures = self.memory.interval()
        if run:
            figures.update(self.memory.run())
            self._run_reported = True
        self._steps_in_interval = 0
        if figures:
            should_log = control.should_log
            self.trainer.log({f"{self.prefix}{key}": value for key, value in figures.items()})
            control.should_log = should_log
