"""Packing (data.packing): several whole examples per row of data.max_seq_len tokens, kept apart.

Each row carries `position_ids` that restart at 0 with every example. Given position ids and no attention
mask, transformers (`masking_utils.find_packed_sequence_indices`) attends only within each run of consecutive
positions, for sdpa, eager and flex attention alike; the training loop drops the mask of such batches. The
first label of every example is -100, so no token is trained to predict the next example's first token: each
example's loss is the one it has alone. Rows are padded to data.max_seq_len, so every packed batch has the
full-length shape `memft memory` estimates; the padding continues the last example's positions, after every
real token (causal attention keeps it out of their view), with label -100 and attention_mask 0 (so it is not
counted as a token seen).
"""

from __future__ import annotations

from bisect import bisect_left, insort

from memft.train.data.encoding import IGNORE_INDEX, count


def pack(examples: list[dict], seq_len: int, pad_id: int) -> list[dict]:
    """Rows of whole examples (each at most `seq_len` tokens), best-fit decreasing: the longest example first,
    each into the row with the least room that still holds it. Rows are in data order (by their first
    example), their examples too."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    rows: list[list[int]] = []
    rows_with_room: dict[int, list[int]] = {}  # free tokens -> rows with exactly that much room
    room: list[int] = []  # the keys of rows_with_room, sorted
    for i in sorted(range(len(examples)), key=lambda i: -lengths[i]):
        at = bisect_left(room, lengths[i])
        if at < len(room):
            free = room[at]
            row = rows_with_room[free].pop()
            if not rows_with_room[free]:
                del rows_with_room[free], room[at]
        else:
            free, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        left = free - lengths[i]
        if left:
            if left not in rows_with_room:
                insort(room, left)
                rows_with_room[left] = []
            rows_with_room[left].append(row)
    return [_row([examples[i] for i in members], seq_len, pad_id) for members in sorted(sorted(r) for r in rows)]


def _row(examples: list[dict], seq_len: int, pad_id: int) -> dict:
    ids, labels, positions = [], [], []
    for ex in examples:
        ids += ex["input_ids"]
        labels += [IGNORE_INDEX] + ex["labels"][1:]
        positions += range(len(ex["input_ids"]))
    pad = seq_len - len(ids)
    return {"input_ids": ids + [pad_id] * pad, "labels": labels + [IGNORE_INDEX] * pad,
            "position_ids": positions + list(range(positions[-1] + 1, positions[-1] + 1 + pad)),
            "attention_mask": [1] * len(ids) + [0] * pad}


def packing_note(key: str, examples: int, rows: list[dict], seq_len: int) -> str:
    tokens = sum(sum(row["attention_mask"]) for row in rows)
    return (f"{key}: {count(examples, 'example')} packed into {count(len(rows), 'row')} of {seq_len} tokens "
            f"(data.packing; {tokens / (len(rows) * seq_len):.0%} of them data, the rest padding).")
