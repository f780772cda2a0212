"""Datasets: loading (HF `datasets`), formatting, tokenisation, packing and a resumable batch order.

Formats:
- `text`: one document per row in `text_field`; every token is trained on.
- `alpaca`: `instruction`, optional `input`, `output`, rendered with the prompt template below.
- `chat`: `messages` (list of {role, content}) rendered by the tokenizer's chat template.
For alpaca and chat with `loss_on: response`, prompt tokens get label -100 so only responses are learnt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from memft.errors import DataError
from memft.train.recipe import DataSection, DatasetSource

IGNORE_INDEX = -100
BUNDLED = {"memft:alpaca": "alpaca.jsonl", "memft:chat": "chat.jsonl", "memft:text": "text.txt"}
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "data"
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
REQUIRED_COLUMNS = {"alpaca": ("instruction", "output"), "chat": ("messages",)}


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The instruction prompt; the response follows directly after it."""
    if input_text:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def resolve_data_path(path: str) -> str:
    if path.startswith("memft:"):
        if path not in BUNDLED:
            raise DataError(f"data path '{path}' is not a bundled dataset; bundled: {', '.join(BUNDLED)}.")
        return str(BUNDLED_DIR / BUNDLED[path])
    return path


def load_rows(source: DatasetSource, key: str):
    """Rows of a local file or hub dataset as a `datasets.Dataset`; `key` names the recipe field."""
    import datasets

    path = resolve_data_path(source.path)
    local = Path(path)
    if local.suffix in LOADERS or local.exists():
        if not local.is_file():
            raise DataError(f"{key}.path: file '{path}' does not exist. Check the path (relative paths are "
                            "resolved from the current directory).")
        if _is_blank(local):
            raise DataError(f"{key}.path: '{path}' has no rows. Point it at a file with data.")
        builder = LOADERS.get(local.suffix)
        if builder is None:
            raise DataError(f"{key}.path: cannot read '{path}': supported local files are "
                            f"{', '.join(LOADERS)}.")
        try:
            rows = datasets.load_dataset(builder, data_files=str(local), split="train")
        except Exception as exc:  # datasets raises many types for malformed files
            raise DataError(f"{key}.path: cannot parse '{path}' as {builder}: {_first_line(exc)}") from None
    else:
        try:
            rows = datasets.load_dataset(path, split=source.split)
        except Exception as exc:
            raise DataError(f"{key}.path: '{path}' is not a local file and loading it as a hub dataset "
                            f"failed: {_first_line(exc)} If this machine is offline, download the data and "
                            "point the path at a local file.") from None
    if source.max_examples is not None:
        rows = rows.select(range(min(source.max_examples, len(rows))))
    _check_columns(rows, source, key, path)
    return rows


def _is_blank(path: Path) -> bool:
    """Empty or whitespace only (the datasets loaders fail obscurely on such files)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return not head.strip() and path.stat().st_size <= len(head)


def _check_columns(rows, source: DatasetSource, key: str, path: str) -> None:
    if len(rows) == 0:
        raise DataError(f"{key}.path: '{path}' has no rows. Point it at a file with data.")
    required = REQUIRED_COLUMNS.get(source.format, (source.text_field,))
    missing = [c for c in required if c not in rows.column_names]
    if missing:
        raise DataError(f"{key}: format '{source.format}' needs column(s) {', '.join(missing)}, but "
                        f"'{path}' has {', '.join(rows.column_names)}. Fix the file or choose the right "
                        f"{key}.format" + (f" / {key}.text_field." if source.format == "text" else "."))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__).rstrip(".") + "."


# ------------------------------------------------------------------------------------- tokenisation
def encode_row(row: dict, source: DatasetSource, tokenizer, loss_on: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one row, before truncation."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if source.format == "text":
        ids = tokenizer(str(row[source.text_field]))["input_ids"] + eos
        return ids, list(ids)
    if source.format == "alpaca":
        prompt = tokenizer(alpaca_prompt(str(row["instruction"]), str(row.get("input") or "")))["input_ids"]
        response = tokenizer(str(row["output"]), add_special_tokens=False)["input_ids"] + eos
        prompt_labels = [IGNORE_INDEX] * len(prompt) if loss_on == "response" else list(prompt)
        return prompt + response, prompt_labels + response
    return _encode_chat(row["messages"], tokenizer, loss_on)


def _encode_chat(messages: list[dict], tokenizer, loss_on: str) -> tuple[list[int], list[int]]:
    """Render with the chat template; label only the assistant turns (found by rendering prefixes)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data format 'chat' needs a tokenizer with a chat template; this tokenizer has none. "
                        "Use format 'alpaca' or 'text', or a model whose tokenizer defines chat_template.")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
            spans.append((start, end))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if loss_on == "all":
        return ids, list(ids)
    labels = [tok if any(s <= a and b <= e for s, e in spans) and b > a else IGNORE_INDEX
              for tok, (a, b) in zip(ids, encoded["offset_mapping"])]
    return ids, labels


def tokenize_rows(rows, source: DatasetSource, tokenizer, data: DataSection, key: str) -> list[dict]:
    examples = []
    for row in rows:
        ids, labels = encode_row(row, source, tokenizer, data.loss_on)
        if not data.packing:
            ids, labels = ids[: data.max_seq_len], labels[: data.max_seq_len]
        if any(label != IGNORE_INDEX for label in labels):
            examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise DataError(f"{key}: no row has a trainable token after tokenisation and truncation to "
                        f"data.max_seq_len={data.max_seq_len}. Raise max_seq_len or check the data.")
    return pack(examples, data.max_seq_len) if data.packing else examples


def pack(examples: list[dict], seq_len: int) -> list[dict]:
    """Concatenate examples and cut into `seq_len` blocks (the last, shorter block is kept)."""
    ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    return [{"input_ids": ids[i: i + seq_len], "labels": labels[i: i + seq_len]}
            for i in range(0, len(ids), seq_len)]


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (-100 on padding)."""
    length = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------- the splits
@dataclass
class Splits:
    train: list[dict]
    eval: list[dict]


def build_splits(data: DataSection, tokenizer, seed: int) -> Splits:
    train_rows = load_rows(data.train, "data.train")
    if data.eval is not None:
        eval_rows = load_rows(data.eval, "data.eval")
    elif data.eval_fraction > 0 and len(train_rows) >= 2:
        parts = train_rows.train_test_split(test_size=data.eval_fraction, seed=seed, shuffle=True)
        train_rows, eval_rows = parts["train"], parts["test"]
    else:
        eval_rows = None
    train = tokenize_rows(train_rows, data.train, tokenizer, data, "data.train")
    evals = tokenize_rows(eval_rows, data.eval or data.train, tokenizer, data, "data.eval") if eval_rows else []
    return Splits(train, evals)


class BatchOrder:
    """Shuffled batches, epoch after epoch, with a resumable position.

    The order of epoch e is a permutation drawn from `seed + e`, so the position (epoch, cursor) is all
    that resume needs. With several processes each takes its slice of every global batch.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if size < batch_size * world:
            raise DataError(f"data.train has {size} examples after tokenisation, fewer than one global batch "
                            f"({batch_size} x {world} processes). Lower train.batch_size or add data.")
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def next_indices(self) -> list[int]:
        global_batch = self.batch_size * self.world
        if self.cursor + global_batch > self.size:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._perm = self._permutation()
        start = self.cursor + self.rank * self.batch_size
        self.cursor += global_batch
        return self._perm[start: start + self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._perm = self._permutation()
