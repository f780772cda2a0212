"""Report renderings and method suggestions."""

import json

import pytest

from memft.memory import (
    CATEGORIES,
    MemoryReport,
    comparison_markdown,
    largest_category,
    plot_comparison,
    render_table,
    suggestions,
)
from memft.memory.gpus import GIB

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report(name="adamw", **breakdown):
    full = {c: breakdown.get(c, 0) for c in CATEGORIES}
    return MemoryReport(name=name, source="estimated", device="cuda", peak_bytes=sum(full.values()), breakdown=full)


@pytest.mark.parametrize(
    ("category", "method"),
    [
        ("activations", "gradient checkpointing"),
        ("optimizer_state", "GaLore"),
        ("gradients", "layer-wise"),
        ("parameters", "QLoRAM"),
    ],
)
def test_largest_category_and_suggestion(category, method):
    report = _report(**{category: 10 * GIB, "other": GIB})
    assert largest_category(report) == category
    assert method in suggestions(report)[0]


def test_cut_cross_entropy_suggested_when_logits_dominate():
    report = _report(temporaries=4 * GIB, parameters=GIB)
    report.meta.update({"vocab_size": 256_000, "tokens": 4096})  # 3.9 GiB of fp32 logits
    assert any("cut cross-entropy" in s for s in suggestions(report))
    report.meta.update({"vocab_size": 256, "tokens": 16})
    assert not any("cut cross-entropy" in s for s in suggestions(report))


def test_json_markdown_table_and_round_trip():
    report = _report(parameters=13 * GIB, gradients=13 * GIB, optimizer_state=26 * GIB, activations=GIB)
    data = report.to_dict(["4090", "H100 80GB"])
    json.dumps(data)
    assert data["peak_bytes"] == 53 * GIB and data["largest_category"] == "optimizer_state"
    assert [f["fits"] for f in data["fits"]] == [False, True]
    assert MemoryReport.from_dict(data) == report
    md = report.to_markdown()
    assert "| optimizer_state | 26.00 | 49.1% |" in md and "RTX 4090 24GB" in md
    from rich.console import Console

    console = Console(record=True, width=140)
    console.print(render_table(report))
    text = console.export_text()
    assert "optimizer_state" in text and "fits on RTX 3060 12GB: no" in text


def test_pngs_and_comparison(tmp_path):
    a = _report("adamw", parameters=2 * GIB, optimizer_state=4 * GIB)
    b = _report("galore", parameters=2 * GIB, optimizer_state=GIB)
    paths = a.save(tmp_path, "adamw")
    for path in paths.values():
        assert path.stat().st_size > 0
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC
    assert json.loads(paths["json"].read_text())["name"] == "adamw"
    out = plot_comparison({"adamw": a, "galore": b}, tmp_path / "cmp.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    table = comparison_markdown({"adamw": a, "galore": b})
    assert "| galore | 2.00 | 0.00 | 1.00 |" in table
    with pytest.raises(ValueError, match="empty"):
        plot_comparison({}, tmp_path / "x.png")
