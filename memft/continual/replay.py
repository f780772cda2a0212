"""A reservoir replay buffer of tokenised examples (Vitter's algorithm R, ACM TOMS 1985).

Every example ever offered has the same chance capacity / seen of being in the buffer. Examples are
stored unpadded (token ids and labels as int lists, prompt labels keep their -100) and padded only when
sampled, with memft.train.data.collate: right padding, pad labels -100, so replayed padding is never
trained on. The sampling generator's state is part of `state_dict()`, so a resumed run draws the same
replay batches as an uninterrupted one.
"""

from __future__ import annotations

import random

import torch

from memft.train.data import collate


class ReplayBuffer:
    def __init__(self, capacity: int, seed: int = 0):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"replay buffer capacity must be a positive integer, got {capacity!r}.")
        self.capacity = capacity
        self.seen = 0
        self.examples: list[dict[str, list[int]]] = []
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.examples)

    def add(self, example: dict[str, list[int]]) -> None:
        """Offer one unpadded example (input_ids, labels)."""
        item = {"input_ids": list(example["input_ids"]), "labels": list(example["labels"])}
        if len(item["input_ids"]) != len(item["labels"]):
            raise ValueError("replay example: input_ids and labels must have the same length.")
        if len(self.examples) < self.capacity:
            self.examples.append(item)
        else:
            slot = self.rng.randint(0, self.seen)  # uniform on 0..seen inclusive
            if slot < self.capacity:
                self.examples[slot] = item
        self.seen += 1

    def add_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """Offer each row of a right-padded batch, with its padding removed (attention_mask)."""
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
        for row_ids, row_labels, n in zip(ids, labels, lengths):
            self.add({"input_ids": row_ids[:n], "labels": row_labels[:n]})

    def sample(self, count: int, pad_id: int) -> dict[str, torch.Tensor] | None:
        """A padded batch of min(count, len) distinct stored examples, or None when empty."""
        if not self.examples or count < 1:
            return None
        picked = self.rng.sample(range(len(self.examples)), min(count, len(self.examples)))
        return collate([self.examples[i] for i in picked], pad_id)

    def num_tokens(self) -> int:
        return sum(len(ex["input_ids"]) for ex in self.examples)

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"capacity": self.capacity, "seen": self.seen,
                "input_ids": [ex["input_ids"] for ex in self.examples],
                "labels": [ex["labels"] for ex in self.examples],
                "rng": {"version": version, "internal": list(internal), "gauss_next": gauss}}

    def load_state_dict(self, state: dict) -> None:
        self.capacity, self.seen = int(state["capacity"]), int(state["seen"])
        self.examples = [{"input_ids": list(i), "labels": list(l)} for i, l in zip(state["input_ids"],
                                                                                  state["labels"])]
        rng = state["rng"]
        self.rng.setstate((rng["version"], tuple(rng["internal"]), rng["gauss_next"]))
