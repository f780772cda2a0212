"""Mixing several training sources by weight (data.mix), deterministically from train.seed.

The mixture holds as many examples as the sources together, N. Source i, of n_i examples and weight w_i,
gives c_i = w_i / sum(w) x N of them, rounded by largest remainder so that the counts sum to N. A source
with c_i <= n_i gives c_i of its examples drawn without repeats; one with c_i > n_i gives every example
c_i // n_i times and c_i % n_i of them once more, drawn the same way. The draws, one source after the other,
and the final shuffle of the mixture come from one generator seeded with train.seed.
"""

from __future__ import annotations

import math

import torch

from memft.errors import DataError
from memft.train.data.encoding import count


def shares(total: int, weights: list[float]) -> list[int]:
    """`total` split in proportion to `weights`, rounded by largest remainder (ties: the earlier source)."""
    quotas = [total * w / sum(weights) for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix(parts: list[tuple[str, list[dict], float]], seed: int) -> tuple[list[dict], str]:
    """The mixture of (key, examples, weight) parts and a note on what each part gives."""
    counts = shares(sum(len(examples) for _, examples, _ in parts), [weight for _, _, weight in parts])
    generator = torch.Generator().manual_seed(seed)
    mixture, given = [], []
    for (key, examples, weight), wanted in zip(parts, counts):
        if wanted == 0:
            raise DataError(f"{key}.weight: {weight:g} gives this source no example of the {len(counts)}-source "
                            "mixture; raise its weight or remove the source from data.mix.")
        repeats, extra = divmod(wanted, len(examples))
        drawn = torch.randperm(len(examples), generator=generator)[:extra].tolist()
        mixture += [ex for _ in range(repeats) for ex in examples] + [examples[i] for i in drawn]
        given.append(f"{key} (weight {weight:g}) gives {_given(wanted, len(examples))}")
    order = torch.randperm(len(mixture), generator=generator).tolist()
    note = f"data.mix: {count(len(mixture), 'training example')} mixed by weight: {'; '.join(given)}."
    return [mixture[i] for i in order], note


def _given(wanted: int, size: int) -> str:
    if wanted == size:
        return f"all its {count(size, 'example')}"
    if wanted < size:
        return f"{wanted:,} of its {count(size, 'example')}"
    repeats, extra = divmod(wanted, size)
    times = {1: "once", 2: "twice"}
    more = f", {extra:,} of them {times.get(repeats + 1, f'{repeats + 1} times')}" if extra else ""
    return f"{wanted:,}: each of its {count(size, 'example')} {times.get(repeats, f'{repeats} times')}{more}"
