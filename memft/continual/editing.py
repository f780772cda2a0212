"""The editing harness: apply T edits in sequence, then measure Rel / Gen / Loc once, after all T.

An edit record has `prompt`, `target` (with its leading space) and `loc_prompt` (an unrelated text the
editor may use while editing), and optionally `rephrase` (paraphrased prompt, for Gen) and
`locality_prompt` / `locality_target` (an unrelated fact, for Loc; without them Loc is measured on
`loc_prompt`). The bundled records (memft/data/continual/edits.jsonl) are
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

REQUIRED_FIELDS = ("prompt", "target", "loc_prompt")
OPTIONAL_FIELDS = ("rephrase", "locality_prompt", "locality_target")
LOCALITY_TOKENS = 3  # greedy tokens compared when a record has no locality_target


def load_edits(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """Edit records from a JSON-lines file (default: the bundled edits), the first `limit` of them.

    Each record needs `prompt`, `target` and `loc_prompt` (text); `rephrase` (also read from
    `paraphrase`) and `locality_prompt` / `locality_target` are optional (see `evaluate_edits`)."""
    path = Path(path) if path is not None else DATA_DIR / "edits.jsonl"
    if not path.is_file():
        raise DataError(f"edit file '{path}' does not exist. Point at a .jsonl file of edit records (prompt, "
                        "target, loc_prompt per line).")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"edit file '{path}', line {number}: not valid JSON ({exc.msg}). Each line must be "
                            "one JSON object.") from exc
        if not isinstance(record, dict):
            raise DataError(f"edit file '{path}', line {number}: a JSON object is needed, got "
                            f"{type(record).__name__}.")
        if "rephrase" not in record and "paraphrase" in record:
            record = {**record, "rephrase": record.pop("paraphrase")}
        missing = [f for f in REQUIRED_FIELDS if not isinstance(record.get(f), str) or not record[f]]
        wrong = [f for f in OPTIONAL_FIELDS if f in record and not isinstance(record[f], str)]
        if missing or wrong:
            raise DataError(f"edit file '{path}', line {number}: "
                            + (f"missing text field(s) {', '.join(missing)}" if missing else
                               f"field(s) {', '.join(wrong)} must be text")
                            + f". Each record needs {', '.join(REQUIRED_FIELDS)} and may have "
                            f"{', '.join(OPTIONAL_FIELDS)} (or paraphrase).")
        if ("locality_prompt" in record) != ("locality_target" in record):
            raise DataError(f"edit file '{path}', line {number}: give locality_prompt and locality_target "
                            "together, or neither (Loc then uses loc_prompt).")
        records.append(record)
    if not records:
        raise DataError(f"edit file '{path}' holds no records. Add one JSON object per line.")
    if limit is not None and limit > len(records):
        raise ValueError(f"asked for {limit} edits, but '{path}' holds {len(records)}.")
    return records[:limit]


def _encode(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    return tokenizer(prompt)["input_ids"], tokenizer(target, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _teacher_forced(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str | list[int]]],
                    batch_size: int = 32) -> list[list[int]]:
    """Argmax predictions at the target positions of each (prompt, target text or target token ids)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(pairs), batch_size):
        rows = []
        for prompt, target in pairs[start: start + batch_size]:
            p = tokenizer(prompt)["input_ids"]
            t = tokenizer(target, add_special_tokens=False)["input_ids"] if isinstance(target, str) else target
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
    """The unedited model on each record's locality prompt: the prompt, the target tokens compared,
    its teacher-forced argmax there and its greedy continuation."""
    prompts: list[str]
    targets: list[list[int]]
    teacher_forced: list[list[int]]
    generated: list[list[int]]


def locality_reference(model: nn.Module, tokenizer, edits: Sequence[dict]) -> LocalityReference:
    """Record the unedited model's locality predictions (call before editing). A record's locality text is
    `locality_prompt` / `locality_target`; without them `loc_prompt` and the unedited model's next
    LOCALITY_TOKENS greedy tokens (the editor saw loc_prompt, so that Loc is optimistic)."""
    prompts, targets = [], []
    for e in edits:
        if "locality_prompt" in e:
            prompts.append(e["locality_prompt"])
            targets.append(_encode(tokenizer, e["locality_prompt"], e["locality_target"])[1])
        else:
            prompts.append(e["loc_prompt"])
            targets.append(greedy_tokens(model, tokenizer, e["loc_prompt"], LOCALITY_TOKENS))
    generated = [greedy_tokens(model, tokenizer, p, len(t)) for p, t in zip(prompts, targets)]
    return LocalityReference(prompts, targets, _teacher_forced(model, tokenizer, list(zip(prompts, targets))),
                             generated)


def evaluate_edits(model: nn.Module, tokenizer, edits: Sequence[dict], reference: LocalityReference) -> EditScores:
    """Rel / Gen / Loc of the (edited) model on `edits`; see the module docstring. Gen averages over the
    records with a `rephrase` (None when none has one)."""
    if len(reference.generated) != len(edits):
        raise ValueError("reference must come from locality_reference(model, tokenizer, edits) on the same edits.")
    was_training = model.training
    model.eval()
    try:
        scores = {}
        for key, field in (("rel", "prompt"), ("gen", "rephrase")):
            pairs = [(e[field], e["target"]) for e in edits if field in e]
            if not pairs:
                scores[f"{key}_token"] = scores[f"{key}_exact"] = None
                continue
            targets = [_encode(tokenizer, p, t)[1] for p, t in pairs]
            predicted = _teacher_forced(model, tokenizer, pairs)
            scores[f"{key}_token"] = _mean([sum(a == b for a, b in zip(p, t)) / len(t)
                                            for p, t in zip(predicted, targets)])
            scores[f"{key}_exact"] = _mean([float(greedy_tokens(model, tokenizer, p, len(t)) == t)
                                            for (p, _), t in zip(pairs, targets)])
        predicted = _teacher_forced(model, tokenizer, list(zip(reference.prompts, reference.targets)))
        scores["loc_token"] = _mean([sum(a == b for a, b in zip(p, r)) / len(r)
                                     for p, r in zip(predicted, reference.teacher_forced)])
        scores["loc_exact"] = _mean([float(greedy_tokens(model, tokenizer, p, len(r)) == r)
                                     for p, r in zip(reference.prompts, reference.generated)])
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
