"""The memory chart says what it shows (architecture, size, estimated or measured) and its GPU labels overlap
neither each other nor the bars."""

from __future__ import annotations

import itertools

from memft.memory import CATEGORIES, MemoryReport
from memft.memory.gpus import GIB
from memft.memory.report import breakdown_figure, plot_comparison


def report(name: str, gib: float, source: str = "estimated") -> MemoryReport:
    share = {c: int(gib * GIB / len(CATEGORIES)) for c in CATEGORIES}
    return MemoryReport(name=name, source=source, device="cuda", peak_bytes=sum(share.values()), breakdown=share,
                        meta={"architecture": "LlamaForCausalLM", "parameters": 8_030_261_248})


def test_title_names_the_architecture_and_the_kind_of_figure():
    fig = breakdown_figure({"adamw": report("adamw", 30.0), "galore": report("galore", 17.0)})
    assert fig.axes[0].get_title() == "LlamaForCausalLM, 8.03B parameters: estimated memory at the peak"
    fig = breakdown_figure({"run": report("run", 1.0, source="tracked")})
    assert fig.axes[0].get_title() == "LlamaForCausalLM, 8.03B parameters: measured memory at the peak"


def test_gpu_labels_overlap_nothing(tmp_path):
    fig = breakdown_figure({"a": report("a", 25.0), "b": report("b", 12.5)})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if "RTX" in t.get_text()]
    assert any("RTX 3090 24GB / RTX 4090 24GB" in t.get_text() for t in labels)  # one line, one label
    assert len(labels) == 4  # 12, 16, 24 (shared) and 32 GB cards
    boxes = [t.get_window_extent(renderer) for t in labels]
    for one, other in itertools.combinations(boxes, 2):
        assert not one.overlaps(other)
    axes_box = ax.get_window_extent(renderer)
    assert all(box.x0 >= axes_box.x1 for box in boxes)  # in the margin, beside the bars
    assert plot_comparison({"a": report("a", 23.0)}, tmp_path / "chart.png").stat().st_size > 0
