"""GPU memory capacities, so reports can say "fits on RTX 4090 (24 GB): yes, 3.1 GiB headroom".

``total_gib`` is the capacity ``nvidia-smi`` reports (MiB / 1024). ``usable_gib`` subtracts
``CUDA_CONTEXT_GIB`` = 0.5 GiB, the assumption for the CUDA context and the kernel images PyTorch, cuBLAS and
cuDNN load on first use (CUDA's lazy module loading keeps this around 0.3-0.6 GiB on consumer cards; on an H200
with torch 2.11 / CUDA 13, bench/memory_accuracy.py measured 685 MiB outside the allocator plus a 32 MiB cuBLAS
workspace inside it). Pass ``context_gib`` to ``fits_table`` to use another margin. What remains is the budget
for the caching allocator; the tracked/estimated peak counts tensor storage only, and the allocator's reserved
memory is 7-13% above that in bench/memory_accuracy.md and 47% with activation checkpointing (fragmentation),
so a small positive headroom is a tight fit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

GIB = 1024**3
CUDA_CONTEXT_GIB = 0.5


@dataclass(frozen=True)
class GPU:
    """One GPU model: ``name`` for display, ``model`` token used for lookup, nominal ``memory_gb`` and
    ``total_gib`` as reported by nvidia-smi."""

    name: str
    model: str
    memory_gb: int
    total_gib: float

    def usable_gib(self, context_gib: float = CUDA_CONTEXT_GIB) -> float:
        return self.total_gib - context_gib

    def usable_bytes(self, context_gib: float = CUDA_CONTEXT_GIB) -> int:
        return int(self.usable_gib(context_gib) * GIB)


GPUS: tuple[GPU, ...] = (
    GPU("RTX 3060 12GB", "3060", 12, 12288 / 1024),
    GPU("RTX 4060 Ti 16GB", "4060ti", 16, 16380 / 1024),
    GPU("RTX 3090 24GB", "3090", 24, 24576 / 1024),
    GPU("RTX 4090 24GB", "4090", 24, 24564 / 1024),
    GPU("RTX 5090 32GB", "5090", 32, 32607 / 1024),
    GPU("A100 40GB", "a100", 40, 40960 / 1024),
    GPU("A100 80GB", "a100", 80, 81920 / 1024),
    GPU("H100 80GB", "h100", 80, 81559 / 1024),
    GPU("H200 141GB", "h200", 141, 143771 / 1024),
)

CONSUMER_GPUS: tuple[str, ...] = ("RTX 3060 12GB", "RTX 4060 Ti 16GB", "RTX 3090 24GB", "RTX 4090 24GB", "RTX 5090 32GB")


def get_gpu(name: str | GPU) -> GPU:
    """Look a GPU up by a forgiving name: "4090", "rtx4090", "NVIDIA GeForce RTX 4090", "A100-SXM4-80GB".

    The model token (3060, 4060 Ti, 3090, 4090, 5090, A100, H100, H200) selects the GPU; a memory size
    written as ``<n>GB`` picks between variants (A100 40GB / 80GB).
    """
    if isinstance(name, GPU):
        return name
    if not isinstance(name, str):
        raise TypeError(f"gpu name must be a str or GPU, got {type(name).__name__}.")
    squashed = re.sub(r"[^a-z0-9]", "", name.lower())
    candidates = [g for g in GPUS if g.model in squashed]
    size = re.search(r"(\d+)\s*gb", name.lower())
    if size is not None and len(candidates) > 1:
        candidates = [g for g in candidates if g.memory_gb == int(size.group(1))] or candidates
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise ValueError(
            f"gpu name {name!r} is ambiguous: it matches {', '.join(g.name for g in candidates)}. "
            "Add the memory size (e.g. 'A100 80GB')."
        )
    known = ", ".join(g.name for g in GPUS)
    raise ValueError(f"unknown gpu {name!r}; known GPUs: {known}. Pass one of these names (or a GPU object).")


@dataclass(frozen=True)
class FitRow:
    """Whether ``peak_bytes`` fits in ``gpu``: ``headroom_bytes`` = usable - peak (negative: does not fit)."""

    gpu: GPU
    usable_bytes: int
    fits: bool
    headroom_bytes: int

    def sentence(self) -> str:
        verdict = "yes" if self.fits else "no"
        word = "headroom" if self.fits else "short"
        return f"fits on {self.gpu.name}: {verdict}, {abs(self.headroom_bytes) / GIB:.1f} GiB {word}"


def fits_table(
    peak_bytes: int,
    gpus: Iterable[str | GPU] | None = None,
    context_gib: float = CUDA_CONTEXT_GIB,
) -> list[FitRow]:
    """One row per GPU (default: every known GPU) for a peak of ``peak_bytes`` tensor bytes."""
    if peak_bytes < 0:
        raise ValueError(f"peak_bytes must be >= 0, got {peak_bytes}.")
    if context_gib < 0:
        raise ValueError(f"context_gib must be >= 0, got {context_gib}.")
    rows = []
    for gpu in (get_gpu(g) for g in (gpus if gpus is not None else GPUS)):
        usable = gpu.usable_bytes(context_gib)
        rows.append(FitRow(gpu, usable, peak_bytes <= usable, usable - peak_bytes))
    return rows
