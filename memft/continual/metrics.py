"""Continual-learning and editing metrics.

Task sequences (T tasks). The accuracy matrix R has R[i][j] = accuracy on task j after training on
tasks 0..i (rows: "after task i", columns: "task j"); b[j] is the accuracy of the untrained model.

- average accuracy  A = mean_j R[T-1][j]                                  (after the last task)
- BWT (backward transfer, GEM variant, Lopez-Paz & Ranzato 2017, arXiv 1706.08840):
      BWT = mean over j = 0..T-2 of (R[T-1][j] - R[j][j])                  (negative = forgetting)
- forgetting (Chaudhry et al. 2018, arXiv 1801.10112):
      F = mean over j = 0..T-2 of (max over l = 0..T-2 of R[l][j]) - R[T-1][j]
- FWT (forward transfer, GEM variant): FWT = mean over i = 1..T-1 of (R[i-1][i] - b[i])

Editing (after all T edits have been applied, not after each one): reliability (Rel, the edit prompts),
generalisation (Gen, their paraphrases) and locality (Loc, unrelated prompts: agreement with the model
before editing), each as teacher-forced token accuracy and as exact match of greedy generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


def _check_matrix(R: Sequence[Sequence[float]]) -> int:
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise ValueError(f"accuracy matrix R must be square T x T with T >= 1 (row i: after task i, column j: "
                         f"task j); got row lengths {[len(row) for row in R]}.")
    return T


def average_accuracy(R: Sequence[Sequence[float]]) -> float:
    T = _check_matrix(R)
    return sum(R[T - 1]) / T


def backward_transfer(R: Sequence[Sequence[float]]) -> float:
    """Mean over the first T-1 tasks of R[T-1][j] - R[j][j]; 0.0 for a single task."""
    T = _check_matrix(R)
    if T == 1:
        return 0.0
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def forgetting(R: Sequence[Sequence[float]]) -> float:
    """Mean over the first T-1 tasks of the best earlier accuracy minus the final one."""
    T = _check_matrix(R)
    if T == 1:
        return 0.0
    return sum(max(R[l][j] for l in range(T - 1)) - R[T - 1][j] for j in range(T - 1)) / (T - 1)


def forward_transfer(R: Sequence[Sequence[float]], baseline: Sequence[float]) -> float:
    """Mean over tasks 1..T-1 of R[i-1][i] - b[i] (accuracy before training on task i vs untrained)."""
    T = _check_matrix(R)
    if len(baseline) != T:
        raise ValueError(f"baseline must hold one accuracy per task ({T}), got {len(baseline)}.")
    if T == 1:
        return 0.0
    return sum(R[i - 1][i] - baseline[i] for i in range(1, T)) / (T - 1)


def continual_metrics(R: Sequence[Sequence[float]], baseline: Sequence[float]) -> dict[str, float]:
    """All four summary metrics of an accuracy matrix."""
    return {"average_accuracy": average_accuracy(R), "bwt": backward_transfer(R), "forgetting": forgetting(R),
            "fwt": forward_transfer(R, baseline)}


def plot_accuracy_matrix(R: Sequence[Sequence[float]], task_names: Sequence[str], path: str | Path,
                         title: str = "accuracy after each task") -> Path:
    """Heatmap PNG of R (rows: after task i, columns: task j) with the values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = _check_matrix(R)
    if len(task_names) != T:
        raise ValueError(f"task_names must name the {T} tasks, got {len(task_names)}.")
    fig, ax = plt.subplots(figsize=(1.2 * T + 2.5, 1.0 * T + 1.8))
    image = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(T), task_names, rotation=30, ha="right")
    ax.set_yticks(range(T), [f"after {name}" for name in task_names])
    ax.set_xlabel("evaluated task")
    for i in range(T):
        for j in range(T):
            ax.text(j, i, f"{R[i][j]:.2f}", ha="center", va="center", color="white" if R[i][j] < 0.6 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class EditScores:
    """Rel / Gen / Loc after all edits: token accuracy (teacher-forced) and generation exact match (Gen is
    None when no edit has a paraphrase)."""
    num_edits: int
    rel_token: float
    gen_token: float | None
    loc_token: float
    rel_exact: float
    gen_exact: float | None
    loc_exact: float

    def as_dict(self) -> dict:
        return asdict(self)
