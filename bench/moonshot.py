"""Full fine-tuning of Llama-3-8B on a 24 GB card: the planner's peaks, the refresh's subspace quality and the
tiny model's losses, composition by composition.

    .venv/bin/python bench/moonshot.py      # writes bench/results/moonshot.md (about 8 minutes on 2 CPU cores)

1. Planner: `memft memory <recipe> --config llama-3-8b` in-process (`recipe_memory`: fake tensors, the recipe's own
   builders and two training steps, CUDA target), batch 1 x 2048 and 8192 tokens (packed, full length), gradient
   checkpointing, cut cross-entropy, global clipping at 1.0; the peak, each step's peak (step 1 refreshes every
   subspace, step 2 is the steady state) and the categories at the peak:
   * AdamW with bf16 weights and fp32 moments: not expressible (memft's adamw is torch.optim.AdamW, whose moments
     take the parameters' dtype); bracketed by AdamW on a bf16 model (bf16 moments) and on an fp32 model with
     bf16 autocast (fp32 weights and moments).
   * 8-bit AdamW stepped in backward (torchtune's low-memory single-device recipe, paging aside): no recipe
     selects it (the layer-wise step is a GaLore option and GaLore needs a low-rank target), so it is built
     through the Python API: `LayerwiseOptimizer` over `GaLoreAdamW8bit` with no low-rank group, whose plain
     groups are block-wise 8-bit AdamW; clipping exact, embeddings watched, as the GaLore builder does. Also
     without clipping, as torchtune runs it (it refuses clipping with the optimizer in backward).
   * memft's composition, the shipped recipes/llama3-8b-24gb.yaml (its model stood in for by the shipped
     llama-3-8b config): 8-bit GaLore stepped in backward, rank 64, the LM head a GaLore target at rank 256, randomized
     block-wise subspace refreshes; and the same with exact refreshes.
2. Subspace quality of the randomized refresh (rank 64, oversampling 8, 2 power iterations) against the exact
   top-64 singular subspace: captured energy ‖Pᵀ G‖_F / ‖G‖_F, randomized over exact, on bf16
   low-rank-plus-noise matrices and on every randomized refresh of the tiny model's real gradients (the
   composition's tiny run with update_proj_gap 25: refreshes at steps 0, 25, 50, 75), at the run's rank 64 and
   at rank 16 on the same gradients (a sketch of 24 of the 128 columns instead of 72).
3. Tiny-model losses: recipes/quickstart.yaml (bundled tiny Llama, fp32, 100 steps, lr 2e-3, weight decay 0.01,
   clipping 1.0) with each composition's optimizer method, seeds 0, 1, 2; eval loss after step 100, mean over
   the seeds, and its ratio to AdamW's. The tiny Llama ties its LM head to its embedding, Llama-3-8B does not:
   AdamW and the composition also run with the head untied (a copy of the tied weight, before the methods).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from memft.methods import registry  # noqa: E402
from memft.methods.registry import OptimizerPlan  # noqa: E402
from memft.optimizers.galore import GaLoreAdamW8bit  # noqa: E402
from memft.optimizers.layerwise import LayerwiseOptimizer  # noqa: E402
from memft.optimizers.projector import LowRankProjector  # noqa: E402
from memft.recipe_files import RECIPES_DIR  # noqa: E402
from memft.train import builders  # noqa: E402
from memft.train.loop import finetune  # noqa: E402
from memft.train.memory_estimate import recipe_memory  # noqa: E402
from memft.train.recipe import load_recipe, load_recipe_data  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30
SEQUENCES = (2048, 8192)
TARGETS_GIB = {2048: 18.0, 8192: 22.0}
SEEDS = (0, 1, 2)
COMMON = ["model.dtype=bfloat16", "train.batch_size=1", "train.grad_accum=1", "model.gradient_checkpointing=true",
          "loss.name=cut_cross_entropy", "train.max_grad_norm=1.0", "data.packing=true"]
RECIPE = "llama3-8b-24gb"
COMPOSITION = {k: v for k, v in load_recipe_data(RECIPES_DIR / f"{RECIPE}.yaml")["optimizer"].items()
               if k not in ("lr", "weight_decay")}  # the method; a run brings its own rates
EXACT = {**COMPOSITION, "svd": "exact"}
LM_HEAD_PLAIN = {**{k: v for k, v in COMPOSITION.items() if k != "module_ranks"},
                 "target_modules": [t for t in COMPOSITION["target_modules"] if t != "lm_head"]}
IN_BACKWARD_8BIT = {"name": "galore_adamw8bit", "layerwise": True}  # the step kind; the optimizer is replaced
CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries")


@contextmanager
def adamw8bit_in_backward() -> Iterator[None]:
    """`builders.build_optimizer` returning block-wise 8-bit AdamW stepped in backward (no low-rank group),
    weight decay on matrices only, clipping at train.max_grad_norm with the embeddings watched."""
    original = builders.build_optimizer

    def build(model, recipe):
        s = recipe.optimizer
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": s.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        optimizer = LayerwiseOptimizer(groups, GaLoreAdamW8bit, max_grad_norm=recipe.train.max_grad_norm, lr=s.lr,
                                       betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)
        optimizer.watch_embeddings(model)
        return OptimizerPlan(optimizer, registry.get("optimizer", s.name).step_kind(s))

    builders.build_optimizer = build
    try:
        yield
    finally:
        builders.build_optimizer = original


@contextmanager
def untied_lm_head() -> Iterator[None]:
    """`builders.prepare_model` on a model whose LM head is a copy of its tied embedding, no longer shared."""
    original = builders.prepare_model

    def prepare(model, recipe, *args, **kwargs):
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        return original(model, recipe, *args, **kwargs)

    builders.prepare_model = prepare
    try:
        yield
    finally:
        builders.prepare_model = original


ROWS = {  # label: (recipe, extra overrides, optimizer section or None, builder patch)
    "AdamW, bf16 weights and moments": ("quickstart", [], None, nullcontext),
    "AdamW, fp32 weights and moments, bf16 autocast": (
        "quickstart", ["model.dtype=float32", "train.mixed_precision=bf16"], None, nullcontext),
    "8-bit AdamW stepped in backward (torchtune-style, Python API)": (
        "galore", [], IN_BACKWARD_8BIT, adamw8bit_in_backward),
    "same, clipping off (as torchtune runs it)": (
        "galore", ["train.max_grad_norm=null"], IN_BACKWARD_8BIT, adamw8bit_in_backward),
    f"memft: recipes/{RECIPE}.yaml (8-bit GaLore layer-wise r64, LM head low-rank r256, randomized refresh)": (
        RECIPE, [], None, nullcontext),
    "same, exact-SVD refresh": (RECIPE, ["optimizer.svd=exact"], None, nullcontext),
}
NOT_EXPRESSIBLE = ("AdamW, bf16 weights and fp32 moments", "memft's adamw is torch.optim.AdamW, whose moments take "
                   "the parameters' dtype: fp32 moments come with fp32 weights (the next two rows bracket it)")


def planner(recipe: str, extra: list[str], section: dict | None, patch, seq: int) -> tuple[dict, float]:
    overrides = COMMON + extra + [f"data.max_seq_len={seq}"]
    if section is not None:
        overrides.append(f"optimizer={json.dumps(section)}")
    start = time.time()
    with patch():
        report = recipe_memory(load_recipe(RECIPES_DIR / f"{recipe}.yaml", overrides), config="llama-3-8b",
                               device="cuda")
    steps = {f"step {i + 1}": p / GIB for i, p in enumerate(report.interval_peak_bytes)}
    figures = {"peak": report.peak_bytes / GIB, **steps, **{c: report.breakdown.get(c, 0) / GIB for c in CATEGORIES}}
    return figures, time.time() - start


# ------------------------------------------------------------------------------------------- quality
def captured_energy(grad: torch.Tensor, basis: torch.Tensor, left: bool) -> float:
    """‖Pᵀ G‖_F / ‖G‖_F for an orthonormal basis (``(m, r)`` left or ``(r, n)`` right), in fp64."""
    g, b = grad.double(), basis.double()
    return ((b.T @ g if left else g @ b.T).norm() / g.norm()).item()


def energy_ratio(grad: torch.Tensor, projector: LowRankProjector) -> float:
    """Captured energy of the projector's basis over that of the exact top-r singular subspace of ``grad``."""
    left = projector.left is not None
    basis = projector.left if left else projector.right
    u, _, vh = torch.linalg.svd(grad.double(), full_matrices=False)
    exact = u[:, : basis.shape[1]] if left else vh[: basis.shape[0]]
    return captured_energy(grad, basis, left) / captured_energy(grad, exact, left)


def low_rank_plus_noise(m: int, n: int, noise: float, seed: int) -> torch.Tensor:
    """Rank-128 signal (singular values 1 down to 0.01) plus Gaussian noise of ``noise`` times its norm, bf16."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, 128, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, 128, generator=gen)).Q
    signal = (u * torch.logspace(0, -2, 128)) @ v.T
    gaussian = torch.randn(m, n, generator=gen)
    return (signal + gaussian * (noise * signal.norm() / gaussian.norm())).to(torch.bfloat16)


def synthetic_quality() -> list[list[str]]:
    rows = []
    for shape in ((16384, 512), (512, 16384), (4096, 1024)):
        for noise in (0.1, 0.5, 1.0):
            grad = low_rank_plus_noise(*shape, noise, seed=len(rows))
            exact, randomized = (LowRankProjector(rank=64, svd=svd) for svd in ("exact", "randomized"))
            exact.refresh(grad)
            randomized.refresh(grad)
            left = exact.left is not None
            e = captured_energy(grad, exact.left if left else exact.right, left)
            r = captured_energy(grad, randomized.left if left else randomized.right, left)
            rows.append([f"{shape[0]} x {shape[1]}", f"{noise:g}", f"{e:.4f}", f"{r:.4f}", f"{r / e:.4f}"])
            print("energy", " | ".join(rows[-1]), flush=True)
    return rows


@contextmanager
def energy_probe(ratios: dict[int, list[float]]) -> Iterator[None]:
    """After every randomized refresh (the block-wise path, not the small-matrix fallback), record `energy_ratio`
    of the run's basis, and of a rank-16 randomized basis of the same gradient."""
    original = LowRankProjector.refresh

    def refresh(self, grad):
        original(self, grad)
        if self.svd == "randomized" and min(self.rank, *grad.shape) + self.oversampling < min(grad.shape):
            ratios[self.rank].append(energy_ratio(grad.detach(), self))
            low = LowRankProjector(rank=16, proj_type=self.proj_type, svd="randomized", seed=self.seed)
            original(low, grad)
            ratios[16].append(energy_ratio(grad.detach(), low))

    LowRankProjector.refresh = refresh
    try:
        yield
    finally:
        LowRankProjector.refresh = original


# ------------------------------------------------------------------------------------------ tiny model
def tiny_eval_loss(section: dict | None, patch, seed: int, gap: int | None = None) -> float:
    """Eval loss after recipes/quickstart.yaml's 100 steps with the optimizer method of `section`."""
    overrides = [f"train.seed={seed}", "train.log_every=100"]
    if section is not None:
        method = {**section, **({"update_proj_gap": gap} if gap else {})}
        overrides.append(f"optimizer={json.dumps({**method, 'lr': 2e-3, 'weight_decay': 0.01})}")
    with tempfile.TemporaryDirectory() as out, patch():
        result = finetune(load_recipe(RECIPES_DIR / "quickstart.yaml", overrides + [f"train.output_dir={out}"]))
    return result.eval["eval_loss"]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    start = time.time()
    memory = [[NOT_EXPRESSIBLE[0], ", ".join(map(str, SEQUENCES)), f"not expressible: {NOT_EXPRESSIBLE[1]}",
               *[""] * (len(CATEGORIES) + 4)]]
    for label, (recipe, extra, section, patch) in ROWS.items():
        for seq in SEQUENCES:
            f, seconds = planner(recipe, extra, section, patch, seq)
            fits = "yes" if f["peak"] <= TARGETS_GIB[seq] else "no"
            memory.append([label, str(seq), f"{f['peak']:.2f}", f"{f['step 1']:.2f}", f"{f['step 2']:.2f}",
                           *(f"{f[c]:.2f}" for c in CATEGORIES), fits, f"{seconds:.0f}"])
            print("planner", " | ".join(memory[-1]), flush=True)
    synthetic = synthetic_quality()
    real: dict[int, list[float]] = {COMPOSITION["rank"]: [], 16: []}
    with energy_probe(real):
        tiny_eval_loss(COMPOSITION, nullcontext, seed=0, gap=25)
    print("energy, tiny-model gradients:", {r: (len(v), min(v)) for r, v in real.items()}, flush=True)
    tiny_rows = {
        "AdamW (the quickstart)": (None, nullcontext),
        "8-bit AdamW stepped in backward (torchtune-style)": (IN_BACKWARD_8BIT, adamw8bit_in_backward),
        "memft composition (randomized refresh)": (COMPOSITION, nullcontext),
        "same, exact-SVD refresh": (EXACT, nullcontext),
        "same, LM head plain (not a low-rank target)": (LM_HEAD_PLAIN, nullcontext),
        "AdamW, LM head untied": (None, untied_lm_head),
        "memft composition, LM head untied": (COMPOSITION, untied_lm_head),
    }
    losses = {label: [tiny_eval_loss(section, patch, seed) for seed in SEEDS]
              for label, (section, patch) in tiny_rows.items()}
    tiny = []
    for label, values in losses.items():
        adamw = statistics.mean(losses["AdamW, LM head untied" if "untied" in label else "AdamW (the quickstart)"])
        tiny.append([label, *(f"{v:.4f}" for v in values), f"{statistics.mean(values):.4f}",
                     f"{statistics.mean(values) / adamw:.3f}"])
        print("tiny", " | ".join(tiny[-1]), flush=True)
    minutes = (time.time() - start) / 60
    text = "\n\n".join([
        "# Llama-3-8B full fine-tuning on a 24 GB card",
        f"`.venv/bin/python bench/moonshot.py` ({minutes:.1f} minutes on this machine's 2 CPU cores; no GPU). "
        "Targets (issue 16): full-parameter fine-tuning of Llama-3-8B (vocab 128256), bf16, batch 1, global "
        "clipping at 1.0, planner peak <= 18.0 GiB at 2048 tokens and <= 22.0 GiB at 8192.",
        "## 1. Planner peaks",
        "`memft memory <recipe> --config llama-3-8b` in-process (fake tensors, two training steps, CUDA target), "
        "batch 1, packed full-length batches, gradient checkpointing, cut cross-entropy, clipping at 1.0 (exact and "
        "global in every row); GiB (2^30 bytes): the peak, each step's peak (step 1 refreshes every subspace; step 2 "
        "is the steady state), the categories at the peak. The torchtune-style row is memft's block-wise 8-bit AdamW "
        "stepped in backward, built through the Python API (no recipe selects it: the layer-wise step is a GaLore "
        "option and GaLore needs a low-rank target); bitsandbytes' paged optimizer, which torchtune uses to move "
        "state to the CPU under pressure, is not modelled. The composition is the shipped recipe "
        f"(its optimizer method: `{json.dumps(COMPOSITION)}`). Fake tensors count every tensor; the CUDA context, "
        "cuBLAS/cuSOLVER workspaces and fragmentation are not included.",
        table(["Llama-3-8B, clipping 1.0", "tokens", "peak", "step 1", "step 2", *CATEGORIES, "within target",
               "estimate s"], memory),
        "The exact-SVD row's peak is step 1's refresh of the LM head's subspace: an fp32 copy of the 128256 x 4096 "
        "gradient and the SVD's factors. The randomized refresh reads the bf16 gradient in blocks of at most "
        "(m + n)(r + p) elements, cast to fp32 one block at a time, and holds the fp32 sketch, (m + n)(r + p) "
        "elements; step 1 drops below the steady state, and the peak is step 2's.",
        "## 2. Subspace quality of the randomized refresh",
        "Captured energy ‖Pᵀ G‖_F / ‖G‖_F of the rank-64 basis (std projection: the smaller side), exact SVD vs "
        "randomized (oversampling 8, 2 power iterations), bf16 matrices: a rank-128 signal with singular values "
        "log-spaced from 1 to 0.01, plus Gaussian noise of the given fraction of its norm.",
        table(["shape", "noise / signal", "exact", "randomized", "randomized / exact"], synthetic),
        "Real gradients: every randomized refresh of the composition's tiny run (seed 0, update_proj_gap 25, "
        f"steps 0, 25, 50, 75: {len(real[16])} refreshes of the q/o (128 x 128), gate/up (352 x 128) and down "
        "(128 x 352) projections and the LM head (1024 x 128, tied to the embedding); k/v, 64 x 128, take the exact "
        "path), randomized / exact captured energy: "
        + "; ".join(f"rank {r}: min {min(v):.7f}, mean {statistics.mean(v):.7f}" for r, v in real.items()) + ".",
        "## 3. Tiny-model losses",
        "recipes/quickstart.yaml (bundled tiny Llama: hidden 128, 4 layers, intermediate 352, vocab 1024, LM head "
        "tied to the embedding; fp32; 100 steps, lr 2e-3, weight decay 0.01, clipping 1.0), with each row's optimizer "
        "method; eval loss after step 100 per seed, their mean and its ratio to AdamW's (target: within 3%; untied "
        "rows against untied AdamW). GaLore rows use scale 1.0 (the projected Adam step has Adam's size, so AdamW's "
        "learning rate carries over) and update_proj_gap 200 (one refresh, at step 0). Tied, the LM head as a "
        "GaLore target makes the embedding low-rank too; untied rows copy the tied weight into a separate LM head "
        "before the methods are applied, as Llama-3-8B has. Rank 64 keeps half of the tiny model's 128-wide side, "
        "far more than of the 8B's 4096, and the LM head's rank 256 (optimizer.module_ranks) keeps all of its "
        "128-wide side, where the 8B keeps 256 of 4096: the tiny losses bound the method, not the 8B's ranks.",
        table(["optimizer", *(f"seed {s}" for s in SEEDS), "mean", "/ AdamW"], tiny),
    ]) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "moonshot.md").write_text(text)
    print(f"wrote {RESULTS / 'moonshot.md'} in {minutes:.1f} min")


if __name__ == "__main__":
    main()
