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

The figures go out through ``trainer.log``, so every reporting integration (TensorBoard, W&B, ...) and every
callback's ``on_log`` receives them like the loss: at each logging step of the Trainer (keys below, bytes,
for the interval since the previous logging step), and for the whole run on the last step (or at
``on_train_end`` when training stopped early). On a logging step they ride on the Trainer's own loss line
(the callback merges them into the next ``trainer.log`` call that has a ``loss``), so trainers that add their
metrics to the first log of a step (TRL's ``entropy``, ``mean_token_accuracy``, ``num_tokens``) keep them
beside the loss; on any other step they are logged on their own line.

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
        self._pending: dict[str, Any] = {}  # figures waiting for the Trainer's loss line
        self._wrapped_log: Any = None  # the trainer's own log, while the callback rides on it

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
        self._ride_on_log()
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
        if self._pending:  # no loss line came after the last figures
            figures, self._pending = self._pending, {}
            self.trainer.log(figures)

    def report(self, name: str = "run") -> MemoryReport | None:
        """The tracked steps as a :class:`memft.memory.MemoryReport` (``.print()``, ``.save(directory)`` writes
        JSON, markdown and a PNG), or None when no step was tracked."""
        return self.memory.report(name) if self.memory is not None else None

    def close(self) -> None:
        """Leave the tracker if a step is being tracked (training stopped inside a step), and the trainer's log."""
        if self.memory is not None:
            self.memory.close()
        self._stop_riding()

    def _log(self, control, run: bool = False) -> None:
        """Emit the interval's figures (with ``run``, the run's too): onto the Trainer's loss line when it logs
        this step, else on a line of their own. ``trainer.log`` clears ``control.should_log``, which is restored
        so the Trainer's pending loss log still happens."""
        figures = self.memory.interval()
        if run:
            figures.update(self.memory.run())
            self._run_reported = True
        self._steps_in_interval = 0
        if not figures:
            return
        figures = {f"{self.prefix}{key}": value for key, value in figures.items()}
        if control.should_log and self._wrapped_log is not None:
            self._pending.update(figures)
            return
        should_log = control.should_log
        self.trainer.log(figures)
        control.should_log = should_log

    def _ride_on_log(self) -> None:
        """Route the trainer's ``log`` through :meth:`_merge_pending` for this run."""
        if self._wrapped_log is None:
            self._wrapped_log = self.trainer.log
            self.trainer.log = self._merge_pending

    def _stop_riding(self) -> None:
        if self._wrapped_log is not None:
            if self.trainer.__dict__.get("log") == self._merge_pending:
                del self.trainer.log
            self._wrapped_log = None

    def _merge_pending(self, logs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if self._pending and "loss" in logs:
            logs, self._pending = {**logs, **self._pending}, {}
        return self._wrapped_log(logs, *args, **kwargs)
