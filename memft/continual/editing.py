"""The editing harness: apply T edits in sequence, then measure Rel / Gen / Loc once, after all T.

An edit record has `prompt`, `target` (with its leading space), `rephrase` (paraphrased prompt),
`locality_prompt` / `locality_target` (an unrelated fact, for evaluation) and `loc_prompt` (an unrelated
text the editor may use while editing). The bundled records (memft/data/continual/edits.jsonl) are
counterfactual facts about the world memft:tiny-llama was pretrained on.

    reference = locality_reference(model, tokenizer, edits)      # before editing
    editor = WISE(model, tokenizer)                              # or FineTuneEditor(model, tokenizer)
    run_edit_sequence(editor, edits)
    scores = evaluate_edits(model, tokenizer, edits, reference)  # EditScores

Scores (means over the T edits): token accuracy under teacher forcing (fraction of target tokens that
are the argmax) and exact match of greedy generation (the first len(target) generated tokens equal the
target). Locality compares with the unedited model: the fraction of locality-target positions whose
argmax is unchanged, and whether the greedy continuation is unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from memft.continual.generate import DATA_DIR
from memft.continual.metrics import EditScores
from memft.continual.wise import default_edit_layer
from memft.errors import DataError
from memft.train.data import IGNORE_INDEX, collate

EDIT_FIELDS = ("prompt", "target", "rephrase", "locality_prompt", "locality_target", "loc_prompt")


def load_edits(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """Edit records from a JSON-lines file (default: the bundled edits), the first `limit` of them."""
    path = Path(path) if path is not None else DATA_DIR / "edits.jsonl"
    if not path.is_file():
        raise DataError(f"edit file '{path}' does not exist. Point at a .jsonl file of edit records.")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, record in enumerate(records):
        missing = [f for f in EDIT_FIELDS if not isinstance(record.get(f), str)]
        if missing:
            raise DataError(f"edit file '{path}', record {i}: missing text field(s) {', '.join(missing)}. "
                            f"Each record needs {', '.join(EDIT_FIELDS)}.")
    if limit is not None and limit > len(records):
        raise ValueError(f"asked for {limit} edits, but '{path}' holds {len(records)}.")
    return records[:limit]


def _encode(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    return tokenizer(prompt)["input_ids"], tokenizer(target, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _teacher_forced(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 32
                    ) -> list[list[int]]:
    """Argmax predictions at the target positions of each (prompt, target)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(pairs), batch_size):
        rows = []
        for prompt, target in pairs[start: start + batch_size]:
            p, t = _encode(tokenizer, prompt, target)
            rows.append({"input_ids": p + t, "labels": [IGNORE_INDEX] * len(p) + t})
        batch = collate(rows, tokenizer.pad_token_id or 0)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        predicted = logits[:, :-1].argmax(-1).cpu()
        for i, row in enumerate(rows):
            positions = [j - 1 for j, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
            out.append(predicted[i, positions].tolist())
    return out


@torch.no_grad()
def greedy_tokens(model: nn.Module, tokenizer, prompt: str, count: int) -> list[int]:
    """`count` greedy tokens after `prompt` (full recomputation per token, no cache, so a side memory
    routes on the whole sequence at every step)."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt)["input_ids"]
    generated = []
    for _ in range(count):
        logits = model(input_ids=torch.tensor([ids + generated], device=device)).logits
        generated.append(int(logits[0, -1].argmax()))
    return generated


@dataclass
class LocalityReference:
    """The unedited model's answers on the locality prompts."""
    teacher_forced: list[list[int]]
    generated: list[list[int]]


def locality_reference(model: nn.Module, tokenizer, edits: Sequence[dict]) -> LocalityReference:
    """Record the unedited model's locality predictions (call before editing)."""
    pairs = [(e["locality_prompt"], e["locality_target"]) for e in edits]
    generated = [greedy_tokens(model, tokenizer, p, len(_encode(tokenizer, p, t)[1])) for p, t in pairs]
    return LocalityReference(_teacher_forced(model, tokenizer, pairs), generated)


def evaluate_edits(model: nn.Module, tokenizer, edits: Sequence[dict], reference: LocalityReference) -> EditScores:
    """Rel / Gen / Loc of the (edited) model on `edits`; see the module docstring."""
    if len(reference.generated) != len(edits):
        raise ValueError("reference must come from locality_reference(model, tokenizer, edits) on the same edits.")
    was_training = model.training
    model.eval()
    try:
        scores = {}
        for key, field in (("rel", "prompt"), ("gen", "rephrase")):
            pairs = [(e[field], e["target"]) for e in edits]
            targets = [_encode(tokenizer, p, t)[1] for p, t in pairs]
            predicted = _teacher_forced(model, tokenizer, pairs)
            scores[f"{key}_token"] = _mean([sum(a == b for a, b in zip(p, t)) / len(t)
                                            for p, t in zip(predicted, targets)])
            scores[f"{key}_exact"] = _mean([float(greedy_tokens(model, tokenizer, p, len(t)) == t)
                                            for (p, _), t in zip(pairs, targets)])
        loc_pairs = [(e["locality_prompt"], e["locality_target"]) for e in edits]
        predicted = _teacher_forced(model, tokenizer, loc_pairs)
        scores["loc_token"] = _mean([sum(a == b for a, b in zip(p, r)) / len(r)
                                     for p, r in zip(predicted, reference.teacher_forced)])
        scores["loc_exact"] = _mean([float(greedy_tokens(model, tokenizer, p, len(r)) == r)
                                     for (p, _), r in zip(loc_pairs, reference.generated)])
    finally:
        model.train(was_training)
    return EditScores(num_edits=len(edits), **scores)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class FineTuneEditor:
    """Plain fine-tuning edits (the baseline): the same layer WISE would edit is trained in place with
    AdamW on the target cross-entropy of each edit in turn; no side memory, no routing, no locality loss."""

    def __init__(self, model: nn.Module, tokenizer, layer: str | None = None, lr: float = 1e-3, n_iter: int = 70,
                 stop_loss: float = 0.02):
        if not lr > 0 or not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"FineTuneEditor needs lr > 0 and a positive integer n_iter, got lr={lr!r}, "
                             f"n_iter={n_iter!r}.")
        self.model, self.tokenizer = model, tokenizer
        self.layer_name = layer or default_edit_layer(model)
        for p in model.parameters():
            p.requires_grad_(False)
        self.weight = model.get_submodule(self.layer_name).weight
        self.weight.requires_grad_(True)
        self.lr, self.n_iter, self.stop_loss = lr, n_iter, stop_loss

    def edit(self, prompt: str, target: str, loc_prompt: str | None = None) -> dict[str, float]:
        """Fine-tune on prompt -> target (`loc_prompt` is accepted for a common interface and unused)."""
        p, t = _encode(self.tokenizer, prompt, target)
        ids = torch.tensor([p + t], device=self.weight.device)
        labels = torch.tensor([[IGNORE_INDEX] * len(p) + t], device=self.weight.device)
        optimizer = torch.optim.AdamW([self.weight], lr=self.lr, weight_decay=0.0)
        loss = torch.zeros(())
        for _ in range(self.n_iter):
            logits = self.model(input_ids=ids).logits
            loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX)
            if loss.item() <= self.stop_loss:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        self.weight.grad = None
        return {"ft_loss": loss.item()}

    def parameter_bytes(self) -> dict[str, int]:
        return {"total": 0}


def run_edit_sequence(editor, edits: Sequence[dict]) -> list[dict[str, float]]:
    """Apply every edit in order with `editor.edit(prompt, target, loc_prompt=...)`; per-edit losses."""
    return [editor.edit(e["prompt"], e["target"], loc_prompt=e["loc_prompt"]) for e in edits]
