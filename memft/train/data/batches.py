"""Batches: collation, a resumable shuffled order, and the run length in steps when train.num_epochs sets it."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from memft.errors import DataError
from memft.train.data.encoding import IGNORE_INDEX, count
from memft.train.recipe import Recipe


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (-100 on padding). Packed rows
    (memft.train.data.packing), all of one length, bring their own attention_mask and position_ids; the model
    must get such a batch without its attention_mask, or transformers lets the examples attend to each other."""
    length = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        mask[i, :n] = torch.tensor(ex["attention_mask"]) if "attention_mask" in ex else 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if "position_ids" in examples[0]:
        batch["position_ids"] = torch.tensor([ex["position_ids"] for ex in examples])
    return batch


def model_inputs(batch: dict) -> dict:
    """`batch` as the model must get it. Packed rows (position_ids) go without their attention mask:
    transformers then keeps attention within each example (given the mask, it lets them see each other), and
    their right padding is out of every real token's view. A batch without padding goes without it too:
    transformers then attends causally all the same and builds no mask tensors (which compressed attention
    would keep), exactly as the planner's batches. Checked on the CPU, before the transfer."""
    if "position_ids" in batch or bool(batch["attention_mask"].all()):
        return {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch


def _micro_batches_per_epoch(size: int, batch_size: int, world: int) -> int:
    if size < batch_size * world:
        raise DataError(f"data.train has {size} examples after tokenisation, fewer than one global batch "
                        f"({batch_size} x {world} processes). Lower train.batch_size or add data.")
    return size // (batch_size * world)


class BatchOrder:
    """Shuffled batches, epoch after epoch, with a resumable position.

    The order of epoch e is a permutation drawn from `seed + e`, so the position (epoch, cursor) is all
    that resume needs. With several processes each takes its slice of every global batch. An epoch is
    size // (batch_size x world) global batches; the examples left over wait for a later epoch's order.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        _micro_batches_per_epoch(size, batch_size, world)
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


def with_run_length(recipe: Recipe, examples: int, world: int) -> tuple[Recipe, list[str]]:
    """The recipe with train.num_epochs turned into train.max_steps, for `examples` training examples (packed
    rows with data.packing) on `world` processes, and a note saying how; a recipe whose max_steps decides comes
    back as it is. Every user of max_steps (the loop, the lr schedule, checkpoints) reads the returned recipe."""
    t = recipe.train
    if t.num_epochs is None:
        return recipe, []
    per_epoch = _micro_batches_per_epoch(examples, t.batch_size, world)
    steps = math.ceil(Fraction(str(t.num_epochs)) * per_epoch / t.grad_accum)
    unit = "packed training row" if recipe.data.packing else "training example"
    note = (f"train.num_epochs={t.num_epochs:g}: an epoch of {count(examples, unit)} is "
            f"{count(per_epoch, 'micro-batch', 'micro-batches')} of {t.batch_size * world} "
            f"(train.batch_size={t.batch_size} x {count(world, 'process', 'processes')}), so the run is "
            f"{count(steps, 'optimizer step')} of train.grad_accum={t.grad_accum} micro-batches.")
    train = t.model_copy(update={"max_steps": steps, "num_epochs": None})
    return recipe.model_copy(update={"train": train}), [note]
