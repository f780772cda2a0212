"""The training loop: one screen, on `accelerate.Accelerator`.

    recipe -> model (+ adapter, compressors, loss patch) -> data -> optimizer plan -> steps -> checkpoints

Each optimizer step is `memft.train.step.StepDriver.step` (grad_accum micro-batches, token-normalised loss,
autocast, the plan's step kind), the same step the planner estimates.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memft.errors import RunError
from memft.train import builders, checkpoint, run_dir
from memft.train.distributed import current_processes, engine_for
from memft.train.data import BatchOrder, Splits, build_splits, collate, model_inputs, with_chat_template, with_run_length
from memft.train.models import load_model, load_tokenizer
from memft.train.export import write_pretrained
from memft.train.progress import Progress
from memft.train.trackers import Trackers
from memft.train.trackers import check_installed as check_trackers_installed
from memft.train.recipe import Recipe
from memft.train.run_memory import RunMemory
from memft.train.step import StepDriver, count_items


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    eval: dict | None = None
    peak_bytes: int | None = None
    interrupted: bool = False


class Trainer:
    """Runs one recipe: `Trainer(recipe, resume=False, overwrite=False).run()`.

    `resume`: False, True/"latest" (the output directory's latest checkpoint) or a checkpoint path.
    The output directory is checked before the model and data are loaded.
    """

    def __init__(self, recipe: Recipe, resume: str | bool = False, overwrite: bool = False):
        builders.check_compatibility(recipe)
        check_trackers_installed(recipe.train.report_to)
        _quiet_libraries()
        self.recipe = recipe
        self.out = Path(recipe.train.output_dir)
        t = recipe.train
        self.resume = resume
        # cpu=True also makes accelerate join a torchrun process group over gloo on CUDA-less machines.
        on_cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
        self.engine = engine_for(recipe)
        self.accelerator = self.engine.accelerator(on_cpu)
        self.processes = procs = current_processes()
        self.lock = None
        self.trackers: Trackers | None = None
        # Ctrl-C is caught from here on: during start-up it stops the run before its first step (a library
        # that swallows KeyboardInterrupt while loading cannot lose it); a second Ctrl-C stops at once.
        self._stop_requested = False
        self._previous_handler = _catch_ctrl_c(self._request_stop)
        try:
            if procs.is_main:
                self.lock, notes = run_dir.prepare(self.out, recipe.model_dump(mode="json"), bool(resume), overwrite)
                self._say(*notes)
            procs.barrier()
            self._load(recipe)
        except BaseException:
            self._release()
            raise

    def _load(self, recipe: Recipe) -> None:
        """Model, data, methods, engine and optimizer; the run directory is already locked."""
        t, procs = recipe.train, self.processes
        torch.manual_seed(t.seed)
        self.tokenizer = with_chat_template(load_tokenizer(recipe.model), recipe.data)
        model = load_model(recipe.model)
        self.splits: Splits = build_splits(recipe.data, self.tokenizer, t.seed)
        recipe, length_notes = with_run_length(recipe, len(self.splits.train), procs.world)
        self.recipe = recipe
        if procs.is_main:
            self._say(*self.splits.notes, *length_notes)
        self.prepared = builders.prepare_model(model, recipe, self._calibration_batches())
        built: dict = {}

        def build_plan(model):
            plan = builders.build_optimizer(model, recipe)
            built["optimizer"], built["scheduler"] = plan.optimizer, builders.build_scheduler(plan.optimizer, recipe)
            return plan

        self.model, self.plan = self.engine.prepare(self.accelerator, self.prepared.model, build_plan)
        self.optimizer, self.scheduler = self.plan.optimizer, built["scheduler"]
        self.driver = StepDriver.for_recipe(recipe, self.plan.step_kind, self.engine, self.accelerator, procs)
        self.order = BatchOrder(len(self.splits.train), t.batch_size, t.seed, procs.rank, procs.world)
        self.step, self.tokens_seen = 0, 0
        self.memory = RunMemory(self.engine.unwrap(self.model), built["optimizer"], self.accelerator.device,
                                recipe.memory.track_steps)

    def _calibration_batches(self) -> list[dict]:
        """The first training batches in data order, for methods that score the model on data."""
        adapter = self.recipe.adapter
        count = getattr(adapter, "calibration_batches", 0) if getattr(adapter, "prune_method", "") == "taylor" else 0
        # Global batches (batch_size x processes): every process scores the same data, as one process would.
        pad, size = self.tokenizer.pad_token_id, self.recipe.train.batch_size * self.processes.world
        return [collate(self.splits.train[i * size: (i + 1) * size], pad) for i in range(count)]

    # ----------------------------------------------------------------------------------- one step
    def _next_micro_batches(self) -> list[dict]:
        pad = self.tokenizer.pad_token_id
        return [collate([self.splits.train[i] for i in self.order.next_indices()], pad)
                for _ in range(self.recipe.train.grad_accum)]

    def train_step(self, micro: list[dict]) -> float:
        """One optimizer step over `micro` (memft.train.step); returns the step's mean token loss."""
        tokens = int(self.processes.sum(float(sum(b["attention_mask"].sum() for b in micro))))
        micro = [{k: v.to(self.accelerator.device) for k, v in model_inputs(b).items()} for b in micro]
        loss = float(self.driver.step(self.model, self.optimizer, micro))
        if not math.isfinite(loss):
            raise RunError(f"The loss became {loss} at step {self.step + 1}; training stopped. The last good "
                           f"checkpoint in '{self.out / 'checkpoints'}' is kept. Lower optimizer.lr, enable "
                           "train.max_grad_norm, or use bfloat16/float32.")
        if not self.driver.skipped:
            self.scheduler.step()
        self.tokens_seen += tokens
        return loss

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean token loss and perplexity over the eval split, or its first `eval_batches` global batches
        (batch_size x processes examples each); every process evaluates its share."""
        if not self.splits.eval:
            return {}
        self.model.eval()
        t, acc, pad, procs = self.recipe.train, self.accelerator, self.tokenizer.pad_token_id, self.processes
        limit = len(self.splits.eval) if t.eval_batches is None else t.eval_batches * t.batch_size * procs.world
        mine = self.splits.eval[:limit][procs.rank:: procs.world]
        total, count = 0.0, 0
        for start in range(0, len(mine), t.batch_size):
            batch = model_inputs(collate(mine[start: start + t.batch_size], pad))
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            n = count_items([batch])
            if n:
                total += self.driver.loss(self.model, batch, n).float().item() * n
                count += n
        self.model.train()
        total, count = procs.sum(total), int(procs.sum(count))
        loss = total / max(count, 1)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}

    # ------------------------------------------------------------------------------------ the run
    def _loop_state(self) -> dict:
        return {"data": self.order.state_dict(), "tokens_seen": self.tokens_seen, **self.driver.state_dict(),
                "metrics_bytes": run_dir.metrics_size(self.out), "recipe": self.recipe.model_dump(mode="json")}

    def save(self) -> None:
        """Checkpoint the current step; every process writes its share (memft.train.distributed)."""
        checkpoint.save_checkpoint(self.out / "checkpoints", self.step, self.engine, self.model, self.optimizer,
                                   self.scheduler, self._loop_state(), self.recipe.train.keep_checkpoints,
                                   self.processes)

    def _resume(self, resume: str | bool) -> None:
        """Restore the newest intact checkpoint (the main process chooses it and says why), or start from
        step 0 when the run wrote none; metrics.jsonl is cut back to what it held at that checkpoint."""
        procs, path, error, code = self.processes, None, None, 0.0
        explicit = isinstance(resume, str) and resume not in ("", "latest")
        if procs.is_main:  # code for the other processes: 0 failed, 1 no checkpoint, 2 explicit, 3 + step
            try:
                path, notes = checkpoint.find_checkpoint(self.out, resume)
                self._say(*notes)
                code = 1.0 if path is None else 2.0 if explicit else 3.0 + checkpoint.step_of(path)
            except RunError as exc:
                error = exc
        code = procs.sum(code)
        if code == 0:
            raise error or RunError("--resume: the main process found no checkpoint to resume; see its message.")
        if not procs.is_main:
            path = (None if code == 1 else Path(resume) if explicit
                    else self.out / "checkpoints" / f"step-{int(code) - 3:07d}")
        if path is None:
            if procs.is_main:
                run_dir.rewind_metrics(self.out, 0, 0)
            return
        state = checkpoint.load_checkpoint(path, self.engine, self.model, self.optimizer, self.scheduler,
                                           self.processes, self.recipe.model_dump(mode="json"))
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.order.load_state_dict(state["data"])
        self.driver.load_state_dict(state)
        if procs.is_main:
            run_dir.rewind_metrics(self.out, state.get("metrics_bytes"), self.step)

    def run(self) -> RunResult:
        t = self.recipe.train
        if self.processes.is_main:
            run_dir.write_run_file(self.out, self.recipe.model_dump(mode="json"))
        self.processes.barrier()
        if self.resume:
            self._resume(self.resume)
        result = RunResult(self.out, self.step)
        metrics = open(self.out / "metrics.jsonl", "a") if self.processes.is_main else None
        self.trackers = (Trackers(t.report_to, self.out, self.out.resolve().name, self.recipe.model_dump(mode="json"))
                         if t.report_to and self.processes.is_main else None)
        self.model.train()
        try:
            with Progress(t.max_steps, self.step, enabled=self.processes.is_main, every=t.log_every) as progress:
                self.progress = progress
                interval_start, interval_tokens = time.perf_counter(), self.tokens_seen
                while self.step < t.max_steps and not self._stop_requested:
                    micro = self._next_micro_batches()
                    with self.memory.measuring():
                        loss = self.train_step(micro)
                    self.step += 1
                    result.losses.append(loss)
                    lr = self.scheduler.get_last_lr()[0]
                    elapsed = time.perf_counter() - interval_start
                    tps = (self.tokens_seen - interval_tokens) / max(elapsed, 1e-9)
                    progress.update(self.step, loss=loss, lr=lr, tokens_per_s=tps, peak=self.memory.peak_bytes())
                    if self.step % t.log_every == 0 or self.step == t.max_steps:
                        self._write(metrics, {"step": self.step, "loss": loss, "lr": lr, "tokens": self.tokens_seen,
                                              "tokens_per_s": tps, **self.memory.interval()})
                        interval_start, interval_tokens = time.perf_counter(), self.tokens_seen
                    if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                        self._write_eval(metrics, self.evaluate())
                    if t.save_every and self.step % t.save_every == 0 and self.step < t.max_steps:
                        self.save()
            result.interrupted = self._stop_requested
            figures = self.memory.run()
            result.peak_bytes = figures.get("run_tracked_peak_bytes", figures.get("run_cuda_peak_allocated_bytes"))
            _write_memory_report(self.memory, self.recipe, self.out, self.processes.rank)
            if result.losses or not result.interrupted:  # stopped before its first step: nothing new to save
                self.save()
            if not result.interrupted:
                result.eval = self.evaluate()
                self._write_eval(metrics, result.eval)
                self._save_final()
        finally:
            if metrics:
                metrics.close()
            if self.trackers is not None:
                self.trackers.finish()
            self._release()
        result.steps = self.step
        return result

    def _release(self) -> None:
        """Give back the run directory and the Ctrl-C handler (at the end of the run, or a failed start)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def _say(self, *notes: str) -> None:
        """Notes for the user, printed by the main process before training (stderr, like warnings)."""
        for note in notes:
            print(f"memft: {note}", file=sys.stderr)

    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop_requested = True
        if self.processes.is_main:
            self._say("Ctrl-C: stopping at the end of the current step (before the first one during start-up), "
                      "with a checkpoint; press Ctrl-C again to stop at once (the latest checkpoint is kept).")

    def _write_eval(self, handle, figures: dict) -> None:
        """An evaluation: metrics.jsonl and the trackers, and a line on the console."""
        self._write(handle, {"step": self.step, **figures})
        if figures and self.processes.is_main:
            self.progress.say(f"eval at step {self.step}: loss {figures['eval_loss']:.4f}, perplexity "
                              f"{figures['eval_perplexity']:.2f} ({figures['eval_tokens']:,} tokens)")

    def _write(self, handle, record: dict) -> None:
        """A line of metrics.jsonl (main process), sent to the trackers too."""
        if self.trackers is not None and record:
            self.trackers.log(record)
        if handle is not None and record:
            try:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
            except OSError as exc:
                raise RunError(f"Could not write '{handle.name}' ({exc.strerror}); training stopped. The "
                               "checkpoints already written are intact: free disk space and continue with "
                               "--resume.") from exc

    def _save_final(self) -> None:
        """`final/`: a directory `from_pretrained` (or `PeftModel.from_pretrained`) loads."""
        full_state = self.engine.full_state_dict(self.model)  # collective for sharding engines
        if not self.processes.is_main:
            return
        final = self.out / "final"
        try:
            write_pretrained(self.prepared, self.engine.unwrap(self.model), self.tokenizer, final, full_state)
        except RunError as exc:
            raise RunError(f"{exc} The last checkpoint in '{self.out / 'checkpoints'}' holds the trained weights: "
                           "run the same command with --resume to write final/ again.") from exc


def _write_memory_report(memory: RunMemory, recipe: Recipe, out: Path, rank: int) -> None:
    """memory.json, memory.md and memory.png for the tracked steps of this process (the main process;
    process r writes memory-rank{r}.*)."""
    if not recipe.memory.report:
        return
    t = recipe.train
    report = memory.report(Path(t.output_dir).name, {
        "model": recipe.model.name_or_path, "dtype": recipe.model.dtype, "batch_size": t.batch_size,
        "grad_accum": t.grad_accum, "max_seq_len": recipe.data.max_seq_len, "optimizer": recipe.optimizer.name,
        "adapter": recipe.adapter.name})
    if report is None:
        return
    budget = recipe.memory.budget_gib
    if budget is not None and report.peak_bytes > budget * 2**30:
        report.notes.append(f"The peak exceeds memory.budget_gib={budget}.")
    if rank:
        report.meta["process"] = rank
    report.save(out, stem="memory" if rank == 0 else f"memory-rank{rank}")


def _catch_ctrl_c(handler):
    """Install `handler` for SIGINT and return the previous one (None where signals cannot be caught: a
    thread other than the main one)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, handler)


def _quiet_libraries() -> None:
    """memft draws its own progress; the libraries' per-file bars and notices would drown it."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def finetune(recipe: Recipe, resume: str | bool = False, overwrite: bool = False) -> RunResult:
    """Run a recipe end to end (the Python API behind `memft finetune`)."""
    return Trainer(recipe, resume=resume, overwrite=overwrite).run()
