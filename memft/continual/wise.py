"""WISE: lifelong model editing with a side memory (Wang et al., arXiv 2405.14768).

The FFN down projection of one late decoder layer, y = W a (a [.., d_ff] is the input of the down
projection, the gated activation), gets a side memory W' (a copy of W) that edits write to; W is never
changed. Routing score of an input (per sequence, averaged over its real tokens t):

    Delta(x) = mean_t || (W' - W) a_t ||_2

Editing (prompt -> target) trains W' by SGD on the cross-entropy of the target (over the prompt and
`num_prefixes` copies with generated prefixes) plus the margin losses that separate the edit from one
unrelated input x_u (`loc_prompt`):

    L_a = relu(Delta(x_u) - alpha) + relu(beta - Delta(x_e)) + relu(gamma - (Delta(x_e) - Delta(x_u)))

(defaults alpha, beta, gamma = 5, 20, 10, the Llama-2 values). Delta(x_e) is taken for every edit row
both over all its tokens and over its prompt tokens only, because greedy generation routes on the prompt
before any target token exists; each edit records the smallest of these. Each shard of `shard_size` edits trains
only a random subset of W' (a gradient mask keeping a fraction `mask_ratio` of the entries, drawn when the
shard starts), and W' stays within +-norm_constraint of W. After `shard_size` edits the shard is stored
and W' restarts from W; every `merge_every` edits the stored shards are merged with TIES
(memft.continual.ties: trim, elect sign, disjoint mean):

- mode "merge": all shards so far (and the previous merged memory, weighted by the shards it holds)
  become one side memory;
- mode "retrieve": the new shards become one more memory; memories are kept side by side.

Inference: each memory k (stored memories, shards awaiting a merge, and the shard being filled once it
holds an edit) has a threshold
eps_k = act_ratio * (smallest recorded Delta_k over the edits it holds). Per sequence, among the memories with
Delta_k >= eps_k the one with the largest Delta_k answers (y = W_k a); if none, the original layer does.
Routing is per row (the reference decides once per batch with .item()) and uses no host sync, so the
layer runs under FakeTensorMode. Thresholds of merged memories are re-measured on the edits they hold
(the reference keeps the minimum recorded before merging, although merging changes Delta).

Default layer: the down projection (Llama-family `mlp.down_proj`, GPT-2 `mlp.c_proj`, GPT-J `mlp.fc_out`,
OPT `fc2`) of decoder layer int(0.85 * num_layers), which is layer 27 of 32 for Llama-2-7B as in the
reference.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from memft.continual.serialization import load_state, save_state, tensor_bytes
from memft.continual.ties import ties_merge
from memft.train.data import IGNORE_INDEX, collate

DOWN_PROJECTIONS = (r"(.*\.)(\d+)\.mlp\.down_proj", r"(.*\.)(\d+)\.mlp\.c_proj", r"(.*\.)(\d+)\.mlp\.fc_out",
                    r"(.*\.)(\d+)\.fc2")
MODES = ("merge", "retrieve")
PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You")


@dataclass
class WISEOptions:
    """See the module docstring; `layer` is a module path (None: the default late down projection)."""
    layer: str | None = None
    alpha: float = 5.0
    beta: float = 20.0
    gamma: float = 10.0
    mask_ratio: float = 0.2
    edit_lr: float = 1.0
    n_iter: int = 70
    stop_loss: float = 0.02
    norm_constraint: float | None = 1.0
    act_ratio: float = 0.88
    shard_size: int = 500
    merge_every: int = 1000
    mode: str = "merge"
    density: float = 0.53
    num_prefixes: int = 4
    prefix_length: int = 5
    seed: int = 0

    def __post_init__(self):
        positive = ("alpha", "beta", "edit_lr", "act_ratio")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"WISE option {name} must be > 0, got {getattr(self, name)!r}.")
        if self.gamma < 0:
            raise ValueError(f"WISE option gamma must be >= 0, got {self.gamma!r}.")
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ValueError(f"WISE option mask_ratio must be in (0, 1] (fraction of W' each shard trains), got "
                             f"{self.mask_ratio!r}.")
        for name in ("n_iter", "shard_size", "merge_every", "prefix_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"WISE option {name} must be a positive integer, got {getattr(self, name)!r}.")
        if not isinstance(self.num_prefixes, int) or self.num_prefixes < 0:
            raise ValueError(f"WISE option num_prefixes must be an integer >= 0, got {self.num_prefixes!r}.")
        if self.merge_every % self.shard_size:
            raise ValueError(f"WISE option merge_every ({self.merge_every}) must be a multiple of shard_size "
                             f"({self.shard_size}): merging combines whole shards.")
        if self.mode not in MODES:
            raise ValueError(f"WISE option mode must be 'merge' or 'retrieve', got {self.mode!r}.")
        if self.norm_constraint is not None and not self.norm_constraint > 0:
            raise ValueError(f"WISE option norm_constraint must be > 0 or None, got {self.norm_constraint!r}.")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"WISE option density must be in (0, 1], got {self.density!r}.")


def default_edit_layer(model: nn.Module) -> str:
    """Module path of the down projection of decoder layer int(0.85 * num_layers)."""
    found: dict[int, str] = {}
    for name, _ in model.named_modules():
        for pattern in DOWN_PROJECTIONS:
            match = re.fullmatch(pattern, name)
            if match:
                found[int(match.group(2))] = name
    if not found:
        raise ValueError("WISE: found no FFN down projection (mlp.down_proj, mlp.c_proj, mlp.fc_out or fc2) in the "
                         "model. Pass layer='<module path of the FFN output projection>'.")
    return found[min(int(0.85 * len(found)), max(found))]


class SideMemory(nn.Module):
    """Replaces the down projection: the original layer, the side memory W' being edited and the stored
    memories, with per-sequence routing (see the module docstring). Weights are kept as [out, in]."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        for p in original.parameters():
            p.requires_grad_(False)
        weight = original.weight
        self.transposed = type(original).__name__ == "Conv1D"  # GPT-2 stores [in, out]
        self.register_buffer("base", (weight.t() if self.transposed else weight).detach().clone(), persistent=False)
        self.current = nn.Parameter(self.base.clone(), requires_grad=False)  # trainable only inside edit()
        self.memories: list[torch.Tensor] = []       # stored memories [out, in]
        self.thresholds: list[float] = []
        self.current_threshold: float | None = None  # None: the shard being filled holds no edit yet
        self.editing = False
        self.token_mask: torch.Tensor | None = None  # [B, S_total] from the model's attention_mask
        self.last_norms: torch.Tensor | None = None  # [B, S] ||(W' - W) a_t|| (set while editing)

    def _linear(self, a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(a, weight, getattr(self.original, "bias", None))

    def _mask(self, a: torch.Tensor) -> torch.Tensor:
        if self.token_mask is None:
            return torch.ones(a.shape[:-1], dtype=a.dtype, device=a.device)
        return self.token_mask[:, -a.shape[-2]:].to(a.dtype)

    def norms(self, a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """||(weight - W) a_t|| [B, S] for a [B, S, d_in]."""
        return F.linear(a, weight - self.base).norm(dim=-1)

    def delta(self, a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Delta [B]: mean over the real tokens of ||(weight - W) a_t||."""
        return masked_mean(self.norms(a, weight), self._mask(a))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if self.editing:
            self.last_norms = self.norms(a, self.current)
            return self._linear(a, self.current)
        out = self.original(a)
        candidates = list(zip(self.memories, self.thresholds))
        if self.current_threshold is not None:
            candidates.append((self.current, self.current_threshold))
        best = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
        for weight, threshold in candidates:
            weight = weight.detach()
            score = self.delta(a, weight)
            use = (score >= threshold) & (score > best)
            out = torch.where(use.view(-1, *([1] * (a.dim() - 1))), self._linear(a, weight), out)
            best = torch.where(use, score, best)
        return out


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim of `values` where `mask` is 1 ([B, S] -> [B])."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@dataclass
class _Shard:
    weight: torch.Tensor
    edits: list[list[int]]   # token ids of each edit's prompt, and prompt + target, to re-measure thresholds
    shards: int = 1          # how many shards a merged memory holds


class WISE:
    """Lifelong editor: `WISE(model, tokenizer, shard_size=..., ...)`, then `.edit(prompt, target,
    loc_prompt=...)` per edit; the model answers through the side memory from then on (it is modified in
    place). `.save(dir)` / `WISE.load(model, tokenizer, dir)` keep the side memory (safetensors + JSON)."""

    def __init__(self, model: nn.Module, tokenizer, options: WISEOptions | None = None, **overrides):
        if options is not None and overrides:
            raise ValueError("give WISE either options=WISEOptions(...) or keyword overrides, not both.")
        known = {f.name for f in fields(WISEOptions)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown WISE option(s): {', '.join(unknown)}. Known: {', '.join(sorted(known))}.")
        self.options = options or WISEOptions(**overrides)
        self.model, self.tokenizer = model, tokenizer
        self.layer_name = self.options.layer or default_edit_layer(model)
        parent_name, _, child = self.layer_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = getattr(parent, child)
        if not hasattr(original, "weight") or original.weight.dim() != 2:
            raise ValueError(f"WISE layer '{self.layer_name}' is a {type(original).__name__}, not a linear "
                             "projection. Pass the FFN down projection's module path.")
        for p in model.parameters():
            p.requires_grad_(False)
        self.generator = torch.Generator().manual_seed(self.options.seed)
        self.prefixes = self._make_prefixes()
        self.memory = SideMemory(original)
        setattr(parent, child, self.memory)
        self._hook = model.register_forward_pre_hook(self._stash_mask, with_kwargs=True)
        self.edit_count = 0
        self.current_edits: list[list[int]] = []
        self.current_deltas: list[float] = []
        self.pending: list[_Shard] = []
        self.stored: list[_Shard] = []
        self.grad_mask: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------ inputs
    def _stash_mask(self, module, args, kwargs):
        self.memory.token_mask = kwargs.get("attention_mask")

    @torch.no_grad()
    def _make_prefixes(self) -> list[str]:
        """Short texts sampled from the model itself (top-5 sampling, seeded), prepended to edit prompts so
        the edit holds in context; generated before the side memory is installed."""
        prefixes = []
        device = next(self.model.parameters()).device
        for i in range(self.options.num_prefixes):
            ids = self.tokenizer(PREFIX_SEEDS[i % len(PREFIX_SEEDS)])["input_ids"]
            for _ in range(self.options.prefix_length):
                logits = self.model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
                top = logits.topk(5)
                choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=self.generator)
                ids.append(int(top.indices[choice]))
            prefixes.append(self.tokenizer.decode(ids, skip_special_tokens=True).replace("\n", " ").strip() + ".")
        return prefixes

    def _row(self, prompt: str, target: str | None) -> dict[str, list[int]]:
        ids = self.tokenizer(prompt)["input_ids"]
        if target is None:
            return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)}
        answer = self.tokenizer(target, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids + answer, "labels": [IGNORE_INDEX] * len(ids) + answer}

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    # ----------------------------------------------------------------------------------------- editing
    def edit(self, prompt: str, target: str, loc_prompt: str) -> dict[str, float]:
        """Write one edit (prompt -> target; give the target its leading space) into the side memory;
        `loc_prompt` is an unrelated text whose Delta is pushed below alpha. Returns the final losses."""
        if not isinstance(prompt, str) or not isinstance(target, str) or not target:
            raise TypeError("WISE.edit needs prompt and target as strings (target non-empty, e.g. ' Paris').")
        if not isinstance(loc_prompt, str) or not loc_prompt:
            raise TypeError("WISE.edit needs loc_prompt: an unrelated text (e.g. another fact), used to keep "
                            "unrelated inputs away from the side memory.")
        o = self.options
        rows = [self._row(prompt, target)] + [self._row(f"{p} {prompt}", target) for p in self.prefixes]
        batch = collate(rows + [self._row(loc_prompt, None)], self._pad_id())
        device = self.memory.current.device
        batch = {k: v.to(device) for k, v in batch.items()}
        if self.edit_count % o.shard_size == 0:
            self.grad_mask = (torch.rand(self.memory.current.shape, generator=self.generator) < o.mask_ratio
                              ).to(device=device, dtype=self.memory.current.dtype)
        weight = self.memory.current
        optimizer = torch.optim.SGD([weight], lr=o.edit_lr)
        n = len(rows)
        self.memory.editing = True
        weight.requires_grad_(True)
        try:
            for _ in range(o.n_iter):
                ft_loss, act_loss = self._losses(batch, n)
                loss = ft_loss + act_loss
                if loss.item() <= o.stop_loss:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                weight.grad.mul_(self.grad_mask)
                optimizer.step()
                if o.norm_constraint is not None:
                    with torch.no_grad():
                        weight.copy_(torch.clamp(weight, self.memory.base - o.norm_constraint,
                                                 self.memory.base + o.norm_constraint))
            with torch.no_grad():
                ft_loss, act_loss = self._losses(batch, n)
                edit_delta = float(self._edit_deltas(batch, n).min())
        finally:
            self.memory.editing = False
            weight.requires_grad_(False)
            weight.grad = None
        prompt_ids = [t for t, label in zip(rows[0]["input_ids"], rows[0]["labels"]) if label == IGNORE_INDEX]
        self.current_edits += [prompt_ids, rows[0]["input_ids"]]
        self.current_deltas.append(edit_delta)
        self.memory.current_threshold = o.act_ratio * min(self.current_deltas)
        self.edit_count += 1
        if self.edit_count % o.shard_size == 0:
            self._store_shard()
        if self.edit_count % o.merge_every == 0:
            self._merge()
        return {"ft_loss": float(ft_loss), "act_loss": float(act_loss), "edit_delta": edit_delta}

    def _losses(self, batch: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Target cross-entropy (mean over the n edit rows) and the margin losses L_a."""
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:n, 1:]
        token_loss = F.cross_entropy(logits[:n, :-1].flatten(0, 1).float(), labels.flatten(),
                                     ignore_index=IGNORE_INDEX, reduction="none").view(n, -1)
        scored = (labels != IGNORE_INDEX).float()
        ft_loss = ((token_loss * scored).sum(1) / scored.sum(1)).mean()
        edit = self._edit_deltas(batch, n)
        unrelated = masked_mean(self.memory.last_norms[n:].float(), batch["attention_mask"][n:])
        o = self.options
        act_loss = (F.relu(unrelated - o.alpha).mean() + F.relu(o.beta - edit).mean()
                    + F.relu(o.gamma - (edit.view(-1, 1) - unrelated.view(1, -1))).mean())
        return ft_loss, act_loss

    def _edit_deltas(self, batch: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """Delta of the n edit rows over all their tokens and over their prompt tokens only (generation
        routes on the prompt before any answer token exists): [2n]."""
        norms, real = self.memory.last_norms[:n].float(), batch["attention_mask"][:n]
        prompt = real * (batch["labels"][:n] == IGNORE_INDEX)
        return torch.cat([masked_mean(norms, real), masked_mean(norms, prompt)])

    def _store_shard(self) -> None:
        self.pending.append(_Shard(self.memory.current.detach().clone(), self.current_edits))
        with torch.no_grad():
            self.memory.current.copy_(self.memory.base)
        self.current_edits, self.current_deltas = [], []
        self.memory.current_threshold = None
        self._install_memories()

    def _merge(self) -> None:
        if not self.pending:
            return
        base = self.memory.base
        group = self.pending if self.options.mode == "retrieve" or not self.stored else self.stored + self.pending
        merged = ties_merge(base, [s.weight for s in group], [float(s.shards) for s in group], self.options.density)
        shard = _Shard(merged, [e for s in group for e in s.edits], sum(s.shards for s in group))
        self.stored = self.stored + [shard] if self.options.mode == "retrieve" else [shard]
        self.pending = []
        self._install_memories()

    @torch.no_grad()
    def _install_memories(self) -> None:
        """Stored memories and shards awaiting a merge become routing candidates, each with a threshold
        measured on its own edits."""
        shards = self.stored + self.pending
        self.memory.memories = [s.weight for s in shards]
        self.memory.thresholds = [self.options.act_ratio * self._min_delta(s) for s in shards]

    @torch.no_grad()
    def _min_delta(self, shard: _Shard) -> float:
        return float(self._deltas(shard.edits, [shard.weight]).min())

    @torch.no_grad()
    def _deltas(self, sequences: list[list[int]], weights: list[torch.Tensor]) -> torch.Tensor:
        """Delta of each token sequence under each weight: [len(sequences), len(weights)]."""
        batch = collate([{"input_ids": ids, "labels": ids} for ids in sequences], self._pad_id())
        device = self.memory.current.device
        captured = {}

        def capture(module, args, output) -> None:
            captured["a"] = args[0]

        handle = self.memory.register_forward_hook(capture)
        try:
            self.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        finally:
            handle.remove()
        return torch.stack([self.memory.delta(captured["a"], w) for w in weights], dim=1)

    def routing_scores(self, texts: list[str]) -> tuple[torch.Tensor, list[float]]:
        """Delta of each text under each routing candidate (stored memories, shards awaiting a merge, then
        the shard being filled if it holds edits) [len(texts), K], and the candidates' thresholds."""
        weights = list(self.memory.memories) + ([self.memory.current.detach()]
                                                if self.memory.current_threshold is not None else [])
        thresholds = list(self.memory.thresholds) + ([self.memory.current_threshold]
                                                     if self.memory.current_threshold is not None else [])
        if not weights:
            return torch.zeros(len(texts), 0), []
        return self._deltas([self.tokenizer(t)["input_ids"] for t in texts], weights).cpu(), thresholds

    # ------------------------------------------------------------------------------- memory and state
    def parameter_bytes(self) -> dict[str, int]:
        """Bytes of the side memory: W' being edited, stored memories and shards awaiting a merge."""
        current = tensor_bytes([self.memory.current])
        stored = tensor_bytes(s.weight for s in self.stored)
        pending = tensor_bytes(s.weight for s in self.pending)
        return {"side_memory": current, "stored_memories": stored, "pending_shards": pending,
                "total": current + stored + pending}

    def state_dict(self) -> dict:
        def shard(s: _Shard) -> dict:
            return {"weight": s.weight.detach().clone(), "edits": s.edits, "shards": s.shards}
        return {"options": asdict(self.options), "layer": self.layer_name, "prefixes": self.prefixes,
                "current": self.memory.current.detach().clone(), "current_edits": self.current_edits,
                "current_deltas": self.current_deltas, "edit_count": self.edit_count,
                "pending": [shard(s) for s in self.pending], "stored": [shard(s) for s in self.stored],
                "grad_mask": self.grad_mask if self.grad_mask is not None else torch.zeros(0),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["layer"] != self.layer_name:
            raise ValueError(f"saved WISE state edits layer '{state['layer']}', this editor '{self.layer_name}'. "
                             "Build the editor with the same layer.")
        device = self.memory.current.device
        with torch.no_grad():
            self.memory.current.copy_(state["current"])
        self.prefixes = list(state["prefixes"])
        self.current_edits = [list(e) for e in state["current_edits"]]
        self.current_deltas = [float(d) for d in state["current_deltas"]]
        self.edit_count = int(state["edit_count"])

        def shard(s: dict) -> _Shard:
            return _Shard(s["weight"].to(device), [list(e) for e in s["edits"]], int(s["shards"]))
        self.pending = [shard(s) for s in state["pending"]]
        self.stored = [shard(s) for s in state["stored"]]
        mask = state["grad_mask"]
        self.grad_mask = mask.to(device) if mask.numel() else None
        self.generator.set_state(state["generator"])
        self.memory.current_threshold = (self.options.act_ratio * min(self.current_deltas)
                                         if self.current_deltas else None)
        self._install_memories()

    def save(self, directory: str | Path) -> None:
        """Write `wise.safetensors` + `wise.json` into `directory`."""
        save_state(directory, "wise", self.state_dict())

    @classmethod
    def load(cls, model: nn.Module, tokenizer, directory: str | Path) -> WISE:
        """An editor on `model` (the unedited model) restored from `save(directory)`."""
        state = load_state(directory, "wise")
        options = WISEOptions(**{**state["options"], "num_prefixes": 0})
        editor = cls(model, tokenizer, options)
        editor.options = WISEOptions(**state["options"])
        editor.load_state_dict(state)
        return editor

    def remove(self) -> nn.Module:
        """Put the original layer back and return the unedited model."""
        parent_name, _, child = self.layer_name.rpartition(".")
        setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, self.memory.original)
        self._hook.remove()
        return self.model
