"""Packing (data.packing) keeps examples apart: in a packed batch each example has the loss it has alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from memft.train.data import IGNORE_INDEX, collate, load_rows, model_inputs, pack, tokenize_rows
from memft.train.loop import Trainer
from memft.train.models import load_tokenizer, resolve_model_path
from memft.train.recipe import DataSection, DatasetSource, ModelSection, validate_recipe
from tests.conftest import tiny_recipe

SEQ_LEN = 128


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSection())


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[dict]:
    """Alpaca examples (loss on the responses only) and text documents, of many lengths."""
    out = []
    for path, fmt in (("memft:alpaca", "alpaca"), ("memft:text", "text")):
        source = DatasetSource(path=path, format=fmt, max_examples=16)
        out += tokenize_rows(load_rows(source, "data.train"), source, tokenizer, DataSection(max_seq_len=SEQ_LEN), "k")
    return out


def _example(start: int, length: int) -> dict:
    ids = list(range(start, start + length))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]}


def test_rows_hold_whole_examples_best_fit_decreasing_in_data_order():
    examples = [_example(100 * i, n) for i, n in enumerate([5, 3, 7, 2, 4, 6])]
    rows = pack(examples, 8, pad_id=0)
    # 7, 6, 5 open rows; 4 fits none (room 1, 2, 3) and opens a fourth; 3 fills the room-3 row, 2 the room-2 one.
    members = [[0, 1], [2], [3, 5], [4]]
    for row, held in zip(rows, members, strict=True):
        n = sum(len(examples[i]["input_ids"]) for i in held)
        assert row["input_ids"] == sum((examples[i]["input_ids"] for i in held), []) + [0] * (8 - n)
        assert row["position_ids"] == sum((list(range(len(examples[i]["input_ids"]))) for i in held), []) + list(
            range(len(examples[held[-1]]["input_ids"]), len(examples[held[-1]]["input_ids"]) + 8 - n))
        assert row["attention_mask"] == [1] * n + [0] * (8 - n)
    assert rows[2]["labels"] == [IGNORE_INDEX, 301, IGNORE_INDEX] + examples[5]["input_ids"][1:]
    assert rows[1]["labels"] == examples[2]["labels"] + [IGNORE_INDEX]


def test_collate_keeps_the_rows_positions_and_counts_only_real_tokens():
    rows = pack([_example(1, 3), _example(10, 2), _example(20, 4)], 5, pad_id=0)
    batch = collate(rows, pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["labels"][1, 4].item() == IGNORE_INDEX
    assert "attention_mask" not in model_inputs(batch)


def _token_losses(model, batch: dict) -> torch.Tensor:
    """Per-token losses (0 where the label is -100) of each position's next-token prediction, [B, L-1]."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX,
                           reduction="none")


def _per_example(rows: list[dict], losses: torch.Tensor) -> list[tuple[tuple[int, ...], float]]:
    """(input_ids, loss sum) of every example of every packed row; a prediction at position t is that of the
    example holding token t + 1."""
    out = []
    for row, row_losses in zip(rows, losses):
        n = sum(row["attention_mask"])
        starts = [t for t in range(n) if row["position_ids"][t] == 0] + [n]
        for a, b in zip(starts, starts[1:]):
            out.append((tuple(row["input_ids"][a:b]), float(row_losses[a: b - 1].sum())))
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_each_example_in_a_packed_batch_has_its_loss_alone(tokenizer, examples, attention):
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("memft:tiny-llama"), dtype=torch.float32,
                                                 attn_implementation=attention).eval()
    rows = pack(examples, SEQ_LEN, tokenizer.pad_token_id)
    assert len(rows) < len(examples) / 2 and any(0 in row["attention_mask"] for row in rows)  # padding too
    with torch.no_grad():
        alone = {tuple(ex["input_ids"]): float(_token_losses(model, collate([ex], 0)).sum()) for ex in examples}
        batch = collate(rows, tokenizer.pad_token_id)
        packed = _per_example(rows, _token_losses(model, model_inputs(batch)))
        leaky = _per_example(rows, _token_losses(model, {k: v for k, v in batch.items() if k != "position_ids"}))
    assert sorted(ids for ids, _ in packed) == sorted(tuple(ex["input_ids"]) for ex in examples)
    difference = max(abs(loss - alone[ids]) for ids, loss in packed)
    assert difference < 1e-6 * max(alone.values()), difference  # fp32 rounding of sums up to ~100
    # The same rows with one causal mask over each row (no position ids): later examples see earlier ones.
    assert max(abs(loss - alone[ids]) for ids, loss in leaky) > 1.0


def test_a_packed_run_evaluates_each_example_as_an_unpacked_run_does(tmp_path):
    """The loop's own evaluation of the untrained model, on the same held-out rows packed and unpacked."""
    results = {}
    for packing in (False, True):
        recipe = tiny_recipe(tmp_path / str(packing), data={"packing": packing, "max_seq_len": SEQ_LEN},
                             train={"eval_batches": None})
        trainer = Trainer(validate_recipe(recipe))
        try:
            assert ("position_ids" in trainer.splits.eval[0]) == packing
            results[packing] = trainer.evaluate()
        finally:
            trainer._release()
    assert results[True]["eval_tokens"] == results[False]["eval_tokens"]
    assert results[True]["eval_loss"] == pytest.approx(results[False]["eval_loss"], rel=1e-6)
