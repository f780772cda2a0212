"""MoRA: continual learning with a self-activated sparse mixture of rank-1 experts (Lu et al., "Little by
Little", arXiv 2506.21035; not the high-rank MoRA of arXiv 2405.12130).

Each chosen Linear layer y = W x gains, per task, r rank-1 experts (a_i, b_i): a_i is a key [d_in],
b_i a value [d_out]. With all N experts so far (A [N, d_in], B [d_out, N]) and h = A x [N]:

    relevance   s = h / ||h||_2                 ("l2": normalised over all N experts, s in [-1, 1])
                s_i = h_i / (||a_i|| ||x||)      ("cosine": each expert's own cosine similarity)
    selection   keep the top-k experts by s (activation budget k); at test time also drop s_i < delta
    weights     w = softmax(s / tau) over the kept experts (0 elsewhere)
    output      y = W x + sum_i w_i * c_i * b_i * h_i      (c_i = alpha / r for the current task's
                                                           experts; 1 for frozen ones, see below)

Experts infer their own relevance from their key activation: there is no router. When a new task
begins, the previous task's experts are frozen (kept as buffers, never updated again) with the scale
alpha / r folded into b, so the forward pass is unchanged by freezing; the new task's experts start with
a_i ~ Kaiming-uniform (as LoRA's A) and b_i = 0. Parameters grow linearly, r * (d_in + d_out) per
adapted layer per task: `parameter_bytes()` reports it.

Defaults follow the reference: r = 8, k = 8, tau = 0.02 (reference range 0.01-0.03), delta = 0.2. The
paper's normalisation is taken to be the l2 normalisation of the expert activations; "cosine" is the
per-expert alternative. Relevance is computed per token.

Input-orthogonal keys (`input_subspace_energy`, off by default; a memft extension, not in the paper).
Per-token relevance cannot tell tasks apart on the tokens they share (a common prompt template): a new
task that has to change the model's behaviour there trains new experts that win the routing on those
tokens, and then they win on the old tasks' identical tokens too (on the bundled suite this forgets as
much as sequential LoRA). With `input_subspace_energy = eps`, each adapted layer accumulates the
uncentred input covariance C = sum_t x_t x_t^T while a task trains; at the end of the task the basis
U [d_in, m] of inputs seen so far is extended, as in GPM (Saha et al., arXiv 2103.09762), by the leading
eigenvectors of (I - U U^T) C (I - U U^T) until U captures a fraction eps of trace(C). New experts' keys
start in, and after every optimizer step are projected back onto, the orthogonal complement of U (as
InfLoRA, arXiv 2404.00228, places LoRA's A): on an old task's inputs their h_i = a_i . x is then about 0,
so they neither contribute nor displace the old experts in the top-k, and old tasks keep their outputs;
the price is plasticity, since new experts only see the part of the new inputs outside U. U costs
d_in * m floats per layer (`parameter_bytes()` reports it) and can fill up after many tasks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from memft.continual.base import LLAMA_LINEAR, ContinualMethod
from memft.continual.serialization import tensor_bytes

RELEVANCE = ("l2", "cosine")


@dataclass
class MoRAOptions:
    """r: rank-1 experts added per task and layer; top_k: activation budget; tau: softmax temperature;
    delta: test-time relevance threshold; alpha: scale numerator (alpha / r); relevance: 'l2' or 'cosine';
    target_modules: Linear name suffixes; seed: expert initialisation; input_subspace_energy: None (the
    paper's free keys) or eps in (0, 1), keys of new experts orthogonal to the input subspace holding a
    fraction eps of earlier tasks' input energy (see the module docstring; 0.95 on the bundled suite)."""
    r: int = 8
    top_k: int = 8
    tau: float = 0.02
    delta: float = 0.2
    alpha: float = 16.0
    relevance: str = "l2"
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEAR))
    seed: int = 0
    input_subspace_energy: float | None = None

    def __post_init__(self):
        for name in ("r", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoRA option {name} must be a positive integer, got {value!r}.")
        if not self.tau > 0:
            raise ValueError(f"MoRA option tau must be > 0 (softmax temperature, reference 0.01-0.03), got "
                             f"{self.tau!r}.")
        if not -1.0 <= self.delta <= 1.0:
            raise ValueError(f"MoRA option delta must be in [-1, 1] (relevance is normalised), got {self.delta!r}.")
        if not self.alpha > 0:
            raise ValueError(f"MoRA option alpha must be > 0, got {self.alpha!r}.")
        if self.relevance not in RELEVANCE:
            raise ValueError(f"MoRA option relevance must be one of {', '.join(RELEVANCE)}, got "
                             f"{self.relevance!r}.")
        if self.input_subspace_energy is not None and not 0.0 < self.input_subspace_energy < 1.0:
            raise ValueError(f"MoRA option input_subspace_energy must be None (free keys) or in (0, 1) (fraction "
                             f"of old inputs' energy the protected subspace holds, e.g. 0.95), got "
                             f"{self.input_subspace_energy!r}.")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"MoRA option target_modules must be a non-empty list of Linear name suffixes, got "
                             f"{self.target_modules!r}.")


def expert_relevance(h: torch.Tensor, x: torch.Tensor, keys: torch.Tensor, mode: str,
                     eps: float = 1e-8) -> torch.Tensor:
    """s [..., N] from h = x @ keys.T [..., N], x [..., d_in], keys [N, d_in]."""
    if mode == "l2":
        return h / (h.norm(dim=-1, keepdim=True) + eps)
    return h / (x.norm(dim=-1, keepdim=True) * keys.norm(dim=-1) + eps)


def expert_weights(s: torch.Tensor, top_k: int, tau: float, delta: float | None) -> torch.Tensor:
    """w [..., N]: softmax(s / tau) over the top-k experts (and s >= delta when given), 0 elsewhere."""
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep.scatter_(-1, s.topk(min(top_k, s.shape[-1]), dim=-1).indices, True)
    if delta is not None:
        keep &= s >= delta
    logits = (s / tau).masked_fill(~keep, float("-inf"))
    logits = torch.where(keep.any(dim=-1, keepdim=True), logits, torch.zeros_like(logits))  # no NaN rows
    return torch.softmax(logits, dim=-1) * keep


def extend_input_basis(basis: torch.Tensor, covariance: torch.Tensor, energy: float) -> torch.Tensor:
    """GPM basis update (arXiv 2103.09762): `basis` [d, m] (orthonormal columns) extended by the leading
    eigenvectors of the residual covariance (I - U U^T) C (I - U U^T) until it captures a fraction
    `energy` of trace(C) (C [d, d], uncentred input covariance of the last task). Returns [d, m']."""
    covariance = covariance.double()
    total = torch.trace(covariance)
    u = basis.double()
    captured = torch.trace(u.t() @ covariance @ u) if u.shape[1] else total.new_zeros(())
    if total <= 0 or captured >= energy * total or u.shape[1] == covariance.shape[0]:
        return basis
    residual = covariance - u @ (u.t() @ covariance) if u.shape[1] else covariance
    residual = residual - (residual @ u) @ u.t() if u.shape[1] else residual
    values, vectors = torch.linalg.eigh((residual + residual.t()) / 2)
    values, vectors = values.flip(0), vectors.flip(1)
    needed = energy * total - captured
    count = min(int((values.cumsum(0) < needed).sum()) + 1, covariance.shape[0] - u.shape[1])
    return torch.cat([basis, vectors[:, :count].to(basis)], dim=1)


class MoRALinear(nn.Module):
    """A frozen nn.Linear plus frozen (buffers) and current-task (parameters) rank-1 experts; with
    input-orthogonal keys also the protected input basis [d_in, m] (buffer) and, while a task trains,
    its input covariance [d_in, d_in]."""

    def __init__(self, base: nn.Linear, options: MoRAOptions):
        super().__init__()
        self.base = base
        self.options = options
        self.scale = options.alpha / options.r
        self.test_threshold = False
        d_out, d_in = base.weight.shape
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.register_buffer("frozen_A", torch.zeros(0, d_in, **factory))
        self.register_buffer("frozen_B", torch.zeros(d_out, 0, **factory))
        self.A = nn.Parameter(torch.zeros(0, d_in, **factory))
        self.B = nn.Parameter(torch.zeros(d_out, 0, **factory))
        self.register_buffer("input_basis", torch.zeros(d_in, 0, dtype=torch.float32, device=base.weight.device))
        self.input_covariance: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.frozen_A.shape[0] + self.A.shape[0]

    @torch.no_grad()
    def add_experts(self, generator: torch.Generator) -> None:
        """Freeze the current experts (alpha / r folded into B) and add r fresh trainable ones."""
        if self.A.shape[0]:
            self.frozen_A = torch.cat([self.frozen_A, self.A.detach().clone()])
            self.frozen_B = torch.cat([self.frozen_B, self.B.detach() * self.scale], dim=1)
        d_in, r = self.base.in_features, self.options.r
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)), as LoRA initialises A
        a = torch.rand(r, d_in, generator=generator, dtype=torch.float32) * 2 * bound - bound
        if self.input_basis.shape[1]:  # start orthogonal to old inputs, with the usual key norms
            u = self.input_basis.to(a.device)
            norms = a.norm(dim=1, keepdim=True)
            a = a - (a @ u) @ u.t()
            a = a * norms / a.norm(dim=1, keepdim=True).clamp(min=1e-12)
        self.A = nn.Parameter(a.to(self.frozen_A))
        self.B = nn.Parameter(torch.zeros(self.base.out_features, r).to(self.frozen_B))
        if self.options.input_subspace_energy is not None:
            self.input_covariance = torch.zeros(d_in, d_in, dtype=torch.float32, device=self.input_basis.device)

    @torch.no_grad()
    def project_keys(self) -> None:
        """Project the current keys onto the orthogonal complement of the protected input basis."""
        if self.input_basis.shape[1]:
            u = self.input_basis.to(self.A)
            self.A.sub_((self.A @ u) @ u.t())

    @torch.no_grad()
    def protect_inputs(self, energy: float) -> None:
        """Fold the finished task's input covariance into the protected basis."""
        if self.input_covariance is not None:
            self.input_basis = extend_input_basis(self.input_basis, self.input_covariance, energy)
            self.input_covariance = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.input_covariance is not None:
            flat = x.detach().reshape(-1, x.shape[-1]).to(self.input_covariance.dtype)
            self.input_covariance.addmm_(flat.t(), flat)  # right padding included: the pad token joins U
        out = self.base(x)
        if self.num_experts == 0:
            return out
        keys = torch.cat([self.frozen_A, self.A])
        values = torch.cat([self.frozen_B, self.B * self.scale], dim=1)
        h = F.linear(x, keys)
        s = expert_relevance(h, x, keys, self.options.relevance)
        w = expert_weights(s, self.options.top_k, self.options.tau,
                           self.options.delta if self.test_threshold else None)
        return out + F.linear(w * h, values)


class MoRA(ContinualMethod):
    name = "mora"

    def __init__(self, options: MoRAOptions | None = None):
        super().__init__()
        self.options = options or MoRAOptions()
        self.tasks_started = 0

    def attach(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(False)
        targets = [(name, module) for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in self.options.target_modules]
        if not targets:
            raise ValueError(f"MoRA: no nn.Linear named {self.options.target_modules} in the model. Set "
                             "target_modules to the names of its Linear layers (e.g. q_proj, v_proj).")
        for name, module in targets:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child,
                    MoRALinear(module, self.options))
        self.model = model
        return model

    def layers(self) -> list[tuple[str, MoRALinear]]:
        return [(n, m) for n, m in self._attached().named_modules() if isinstance(m, MoRALinear)]

    def begin_task(self, index: int) -> None:
        generator = torch.Generator().manual_seed(self.options.seed * 100003 + self.tasks_started)
        for _, layer in self.layers():
            layer.add_experts(generator)
        self.tasks_started += 1

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, layer in self.layers() for p in (layer.A, layer.B)]

    def after_step(self) -> None:
        if self.options.input_subspace_energy is not None:
            for _, layer in self.layers():
                layer.project_keys()

    def end_task(self, index: int) -> None:
        if self.options.input_subspace_energy is not None:
            for _, layer in self.layers():
                layer.protect_inputs(self.options.input_subspace_energy)

    @contextmanager
    def evaluating(self) -> Iterator[nn.Module]:
        layers = [layer for _, layer in self.layers()]
        for layer in layers:
            layer.test_threshold = True
        try:
            with super().evaluating() as model:
                yield model
        finally:
            for layer in layers:
                layer.test_threshold = False

    def state_dict(self) -> dict:
        return {"tasks_started": self.tasks_started,
                "layers": {name: {"frozen_A": m.frozen_A.clone(), "frozen_B": m.frozen_B.clone(),
                                  "A": m.A.detach().clone(), "B": m.B.detach().clone(),
                                  "input_basis": m.input_basis.clone()}
                           for name, m in self.layers()}}

    def load_state_dict(self, state: dict) -> None:
        layers = dict(self.layers())
        if sorted(layers) != sorted(state["layers"]):
            raise ValueError("saved MoRA state does not match this model's adapted layers; load a state saved "
                             "with the same model and target_modules.")
        for name, saved in state["layers"].items():
            layer = layers[name]
            layer.frozen_A = saved["frozen_A"].to(layer.frozen_A)
            layer.frozen_B = saved["frozen_B"].to(layer.frozen_B)
            layer.A = nn.Parameter(saved["A"].to(layer.frozen_A))
            layer.B = nn.Parameter(saved["B"].to(layer.frozen_B))
            layer.input_basis = saved["input_basis"].to(layer.input_basis)
        self.tasks_started = int(state["tasks_started"])

    def parameter_bytes(self) -> dict[str, int]:
        layers = [m for _, m in self.layers()]
        trainable = tensor_bytes(p for m in layers for p in (m.A, m.B))
        frozen = tensor_bytes(t for m in layers for t in (m.frozen_A, m.frozen_B))
        basis = tensor_bytes(m.input_basis for m in layers)
        return {"trainable": trainable, "frozen_experts": frozen, "adapter_total": trainable + frozen,
                "input_basis": basis, "experts_per_layer": layers[0].num_experts if layers else 0}
