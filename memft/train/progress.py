"""The progress display: a rich bar on a terminal, plain periodic lines elsewhere (CI, logs)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn


def format_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


class Progress:
    """`with Progress(total, start) as p: p.update(step, loss=..., lr=..., tokens_per_s=..., peak=...)`."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, every: int = 10):
        self.total, self.start, self.enabled, self.every = total, start, enabled, every
        self.console = Console(stderr=True)
        self.interactive = enabled and self.console.is_terminal
        self._bar = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> "Progress":
        if self.interactive:
            self._bar = RichProgress(
                TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console)
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, peak: int | None = None) -> None:
        if not self.enabled:
            return
        info = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  peak {format_bytes(peak)}"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total:
            done = step - self.start
            eta = (time.perf_counter() - self._t0) / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total}  {info}  eta {eta:.0f}s", file=sys.stderr, flush=True)

    def say(self, line: str) -> None:
        """A line on the console above the bar (or between the periodic lines)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(line, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
