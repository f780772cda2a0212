"""Memory reports: the result type shared by the tracker and the estimator, and its renderings.

A ``MemoryReport`` holds a peak (bytes), the bytes per category live at that peak, per-interval peaks,
the state at the end and optional CUDA allocator peaks. It renders as a rich terminal table, a markdown
file, a JSON-ready dict and a PNG stacked bar; ``plot_comparison`` puts several reports side by side.
``largest_category`` and ``suggestions`` name the category to attack and the memft method that cuts it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memft.memory.gpus import CONSUMER_GPUS, GIB, GPU, FitRow, fits_table

CATEGORIES: tuple[str, ...] = (
    "parameters",
    "gradients",
    "optimizer_state",
    "activations",
    "temporaries",
    "other",
)
COLORS = {
    "parameters": "#4C72B0",
    "gradients": "#DD8452",
    "optimizer_state": "#55A868",
    "activations": "#C44E52",
    "temporaries": "#8172B3",
    "other": "#937860",
}
METHOD_FOR_CATEGORY = {
    "activations": "activation compressors (memft.compress_activations: mesa, wta_crs, s2a) "
    "or gradient checkpointing",
    "optimizer_state": "GaLore low-rank optimizer states (GaLoreAdamW8bit for 8-bit states) "
    "or MeZO (no optimizer state)",
    "gradients": "layer-wise updates (the optimizer steps inside backward and frees each gradient) "
    "or MeZO (no gradients)",
    "parameters": "LoRAM / QLoRAM: train LoRA on a pruned (4-bit) model, recover onto the full model",
    "temporaries": "transient buffers: a smaller micro-batch with gradient accumulation",
    "other": "inputs and buffers: check that batches or cached tensors are not kept alive",
}
CUT_CROSS_ENTROPY = "cut cross-entropy (memft.patch_loss(model, 'cut_cross_entropy')) never writes the logits"


@dataclass
class MemoryReport:
    """Peak memory of a run (``source`` "tracked") or of a fake-tensor run (``source`` "estimated").

    All sizes are bytes. ``breakdown`` is the bytes per category live at the peak; ``end_breakdown``
    the bytes per category when the run ended; ``interval_peak_bytes`` one peak per logging interval
    (per step for estimates). ``cuda`` holds ``allocated``/``reserved`` peaks of a real CUDA run.
    ``meta`` describes the run (config, dtype, batch, ...); ``vocab_size`` and ``tokens`` there enable
    the cut-cross-entropy suggestion.
    """

    name: str
    source: str
    device: str
    peak_bytes: int
    breakdown: dict[str, int]
    end_bytes: int = 0
    end_breakdown: dict[str, int] = field(default_factory=dict)
    interval_peak_bytes: list[int] = field(default_factory=list)
    cuda: dict[str, int] | None = None
    module_activations: dict[str, int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def largest_category(self) -> str:
        return largest_category(self)

    def suggestions(self) -> list[str]:
        return suggestions(self)

    def fits(self, gpus: Iterable[str | GPU] | None = None) -> list[FitRow]:
        return fits_table(self.peak_bytes, gpus)

    def to_dict(self, gpus: Iterable[str | GPU] | None = None) -> dict[str, Any]:
        return to_json_dict(self, gpus)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryReport:
        """Inverse of ``to_dict`` (derived fields such as ``fits`` are ignored)."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_markdown(self, gpus: Iterable[str | GPU] | None = None) -> str:
        return to_markdown(self, gpus)

    def print(self, gpus: Iterable[str | GPU] | None = None) -> None:
        print_report(self, gpus)

    def save(self, directory: str | Path, stem: str | None = None) -> dict[str, Path]:
        """Write ``<stem>.md``, ``<stem>.json`` and ``<stem>.png`` into ``directory``; returns the paths."""
        return save_report(self, directory, stem)


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def _share(part: int, total: int) -> str:
    return f"{100 * part / total:.1f}%" if total else "-"


def largest_category(report: MemoryReport) -> str:
    """The category holding the most bytes at the peak."""
    return max(CATEGORIES, key=lambda c: report.breakdown.get(c, 0))


def suggestions(report: MemoryReport) -> list[str]:
    """Which memft method cuts the largest category (first), plus cut cross-entropy when the logits of
    ``meta['tokens']`` x ``meta['vocab_size']`` in fp32 are at least 10% of that category."""
    top = largest_category(report)
    out = [f"largest category at the peak: {top} ({_gib(report.breakdown.get(top, 0))} GiB): {METHOD_FOR_CATEGORY[top]}"]
    vocab, tokens = report.meta.get("vocab_size"), report.meta.get("tokens")
    if top in ("activations", "temporaries") and vocab and tokens:
        logits_bytes = 4 * int(vocab) * int(tokens)
        if logits_bytes >= 0.1 * report.breakdown.get(top, 0):
            out.append(
                f"{CUT_CROSS_ENTROPY}: fp32 logits of {tokens} tokens x {vocab} vocab are {_gib(logits_bytes)} GiB each copy"
            )
    return out


def to_json_dict(report: MemoryReport, gpus: Iterable[str | GPU] | None = None) -> dict[str, Any]:
    """Plain dict (json.dumps-able): every field plus ``largest_category``, ``suggestions`` and ``fits``."""
    data = asdict(report)
    data["largest_category"] = largest_category(report)
    data["suggestions"] = suggestions(report)
    data["fits"] = [
        {"gpu": r.gpu.name, "usable_bytes": r.usable_bytes, "fits": r.fits, "headroom_bytes": r.headroom_bytes}
        for r in report.fits(gpus)
    ]
    return data


def to_markdown(report: MemoryReport, gpus: Iterable[str | GPU] | None = None) -> str:
    """Markdown: breakdown at the peak, per-interval peaks, CUDA peaks, GPU fit, suggestions, notes."""
    lines = [
        f"## Memory: {report.name} ({report.source}, {report.device})",
        "",
        f"Peak: **{_gib(report.peak_bytes)} GiB** ({report.peak_bytes:,} bytes)",
        "",
        "| category | GiB at peak | share | GiB at end |",
        "|---|---:|---:|---:|",
    ]
    for c in CATEGORIES:
        b = report.breakdown.get(c, 0)
        lines.append(f"| {c} | {_gib(b)} | {_share(b, report.peak_bytes)} | {_gib(report.end_breakdown.get(c, 0))} |")
    lines.append(f"| **total** | **{_gib(report.peak_bytes)}** | 100% | {_gib(report.end_bytes)} |")
    if len(report.interval_peak_bytes) > 1:
        lines += ["", "Peak per interval (GiB): " + ", ".join(_gib(b) for b in report.interval_peak_bytes)]
    if report.cuda:
        lines += ["", "CUDA allocator peaks (GiB): " + ", ".join(f"{k} {_gib(v)}" for k, v in report.cuda.items())]
    if report.module_activations:
        lines += ["", "| module | activation GiB |", "|---|---:|"]
        for name, b in sorted(report.module_activations.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {_gib(b)} |")
    lines += ["", "| GPU | usable GiB | fits | headroom GiB |", "|---|---:|:---:|---:|"]
    for row in report.fits(gpus):
        lines.append(f"| {row.gpu.name} | {_gib(row.usable_bytes)} | {'yes' if row.fits else 'no'} | {_gib(row.headroom_bytes)} |")
    lines += [""] + [f"- {s}" for s in suggestions(report)]
    if report.meta:
        lines += ["", "Run: " + ", ".join(f"{k}={v}" for k, v in report.meta.items())]
    lines += [f"- note: {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def render_table(report: MemoryReport, gpus: Iterable[str | GPU] | None = None) -> Any:
    """A ``rich.table.Table`` of the breakdown at the peak, with consumer-GPU fit in the caption."""
    from rich.table import Table

    table = Table(title=f"memory: {report.name} ({report.source}, {report.device})")
    table.add_column("category")
    table.add_column("GiB at peak", justify="right")
    table.add_column("share", justify="right")
    table.add_column("GiB at end", justify="right")
    for c in CATEGORIES:
        b = report.breakdown.get(c, 0)
        table.add_row(c, _gib(b), _share(b, report.peak_bytes), _gib(report.end_breakdown.get(c, 0)))
    table.add_row("total", _gib(report.peak_bytes), "100%", _gib(report.end_bytes), style="bold")
    rows = report.fits(gpus if gpus is not None else CONSUMER_GPUS)
    table.caption = "\n".join([r.sentence() for r in rows] + suggestions(report))
    return table


def print_report(report: MemoryReport, gpus: Iterable[str | GPU] | None = None) -> None:
    from rich.console import Console

    Console().print(render_table(report, gpus))


def plot_breakdown(report: MemoryReport, path: str | Path, gpus: Iterable[str | GPU] | None = None) -> Path:
    """PNG stacked bar of the breakdown at the peak, with dashed lines at the usable memory of ``gpus``."""
    return plot_comparison({report.name: report}, path, gpus)


def plot_comparison(
    reports: Mapping[str, MemoryReport],
    path: str | Path,
    gpus: Iterable[str | GPU] | None = None,
) -> Path:
    """PNG with one stacked bar (breakdown at the peak, GiB) per named report, e.g.
    ``plot_comparison({"adamw": a, "galore": b}, "cmp.png")``. Lines mark usable GPU memory below 1.3x
    the tallest bar (default GPUs: the consumer ones), labelled in the right margin."""
    import matplotlib.pyplot as plt

    fig = breakdown_figure(reports, gpus)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def chart_title(reports: Mapping[str, MemoryReport]) -> str:
    """What the chart shows: the architecture and size, and whether the figures are estimated or measured."""
    kinds = sorted({"estimated" if r.source == "estimated" else "measured" for r in reports.values()})
    first = next(iter(reports.values()))
    model = first.meta.get("architecture") or first.meta.get("model") or first.name
    params = first.meta.get("parameters")
    if params and all(r.meta.get("architecture") == first.meta.get("architecture") for r in reports.values()):
        model = f"{model}, {params / 1e9:.2f}B parameters" if params >= 1e8 else f"{model}, {params / 1e6:.1f}M parameters"
    return f"{model}: {' and '.join(kinds)} memory at the peak"


def _gpu_labels(gpus: Iterable[str | GPU] | None, top: float) -> list[tuple[float, str]]:
    """(usable GiB, label) per line to draw: GPUs with the same usable memory (to 0.1 GiB) share a line."""
    lines: dict[float, list[str]] = {}
    for row in fits_table(0, gpus if gpus is not None else CONSUMER_GPUS):
        usable = row.usable_bytes / GIB
        if usable <= 1.3 * top:
            lines.setdefault(round(usable, 1), []).append(row.gpu.name)
    return sorted((usable, " / ".join(names)) for usable, names in lines.items())


def breakdown_figure(reports: Mapping[str, MemoryReport], gpus: Iterable[str | GPU] | None = None):
    """The matplotlib figure of :func:`plot_comparison`: bars, GPU lines with their labels in the right margin
    (spread apart so none overlaps another), the legend below the axes."""
    if not reports:
        raise ValueError("reports is empty: pass a mapping of name -> MemoryReport.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(reports)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 3.5), 5.0))
    bottoms = [0.0] * len(names)
    for c in CATEGORIES:
        heights = [reports[n].breakdown.get(c, 0) / GIB for n in names]
        ax.bar(names, heights, bottom=bottoms, color=COLORS[c], label=c)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    top = max(bottoms) or 1.0
    for index, total in enumerate(bottoms):
        ax.annotate(f"{total:.2f}", (index, total), ha="center", va="bottom", fontsize=8)
    lines = _gpu_labels(gpus, top)
    ax.set_ylim(0, max([top * 1.08] + [usable * 1.04 for usable, _ in lines]))
    low, high = ax.get_ylim()
    gap = (high - low) * 0.045  # one label's height in data units, at this figure size
    placed: list[float] = []
    for usable, label in lines:
        y = max([usable] + [p + gap for p in placed])
        placed.append(y)
        ax.axhline(usable, color="gray", linestyle="--", linewidth=0.8)
        ax.annotate(label, xy=(1.0, usable), xytext=(1.01, y), xycoords=("axes fraction", "data"),
                    textcoords=("axes fraction", "data"), ha="left", va="center", fontsize=7, color="gray",
                    annotation_clip=False)
    ax.set_ylabel("GiB at peak")
    ax.set_title(chart_title(reports), fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, frameon=False)
    fig.tight_layout()
    return fig


def comparison_markdown(reports: Mapping[str, MemoryReport]) -> str:
    """Markdown table: one row per named report, GiB per category at the peak and the peak itself."""
    header = "| run | " + " | ".join(CATEGORIES) + " | peak GiB |"
    lines = [header, "|---|" + "---:|" * (len(CATEGORIES) + 1)]
    for name, r in reports.items():
        cells = " | ".join(_gib(r.breakdown.get(c, 0)) for c in CATEGORIES)
        lines.append(f"| {name} | {cells} | {_gib(r.peak_bytes)} |")
    return "\n".join(lines) + "\n"


def save_report(report: MemoryReport, directory: str | Path, stem: str | None = None) -> dict[str, Path]:
    """Write markdown, JSON and PNG renderings of ``report``; returns ``{"markdown", "json", "png"}`` paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = stem or "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in report.name)
    paths = {"markdown": directory / f"{stem}.md", "json": directory / f"{stem}.json", "png": directory / f"{stem}.png"}
    paths["markdown"].write_text(to_markdown(report))
    paths["json"].write_text(json.dumps(to_json_dict(report), indent=2, default=str))
    plot_breakdown(report, paths["png"])
    return paths
