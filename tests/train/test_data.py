import json

import pytest

from memft.errors import DataError
from memft.train.data import (IGNORE_INDEX, BatchOrder, alpaca_prompt, build_splits, collate, load_rows,
                              pack, tokenize_rows)
from memft.train.models import load_tokenizer
from memft.train.recipe import DataSection, DatasetSource, ModelSection


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSection())


def _section(**kw) -> DataSection:
    return DataSection(**kw)


def test_alpaca_trains_only_on_the_response(tokenizer):
    source = DatasetSource(path="memft:alpaca", format="alpaca", max_examples=5)
    rows = load_rows(source, "data.train")
    examples = tokenize_rows(rows, source, tokenizer, _section(max_seq_len=512), "data.train")
    row, ex = rows[0], examples[0]
    prompt_len = len(tokenizer(alpaca_prompt(row["instruction"], row["input"]))["input_ids"])
    assert all(label == IGNORE_INDEX for label in ex["labels"][:prompt_len])
    response = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(response) == row["output"] + tokenizer.eos_token
    everything = tokenize_rows(rows, source, tokenizer, _section(max_seq_len=512, loss_on="all"), "data.train")
    assert everything[0]["labels"] == everything[0]["input_ids"]


def test_chat_labels_only_assistant_turns(tokenizer):
    source = DatasetSource(path="memft:chat", format="chat", max_examples=3)
    rows = load_rows(source, "data.train")
    ex = tokenize_rows(rows, source, tokenizer, _section(max_seq_len=512), "data.train")[0]
    trained = tokenizer.decode([t for t in ex["labels"] if t != IGNORE_INDEX])
    assistant = rows[0]["messages"][-1]["content"]
    assert trained.strip() == (assistant + tokenizer.eos_token).strip()
    assert "<|user|>" in tokenizer.decode(ex["input_ids"])


def test_text_format_from_a_local_txt_and_jsonl(tmp_path, tokenizer):
    txt = tmp_path / "corpus.txt"
    txt.write_text("The capital of Kalo is Ri.\nThe river Vo flows.\n")
    rows = load_rows(DatasetSource(path=str(txt), format="text"), "data.train")
    assert len(rows) == 2
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"body": f"document {i}"}) for i in range(4)))
    source = DatasetSource(path=str(jl), format="text", text_field="body")
    examples = tokenize_rows(load_rows(source, "data.train"), source, tokenizer, _section(max_seq_len=32), "k")
    assert len(examples) == 4 and examples[0]["labels"] == examples[0]["input_ids"]


def test_csv_and_parquet_load(tmp_path):
    import datasets

    table = datasets.Dataset.from_dict({"instruction": ["a", "b"], "output": ["x", "y"]})
    table.to_csv(tmp_path / "d.csv")
    table.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        rows = load_rows(DatasetSource(path=str(tmp_path / name), format="alpaca"), "data.train")
        assert rows.column_names[:2] == ["instruction", "output"] and len(rows) == 2


def test_truncation_and_packing(tokenizer):
    source = DatasetSource(path="memft:text", format="text", max_examples=20)
    rows = load_rows(source, "data.train")
    truncated = tokenize_rows(rows, source, tokenizer, _section(max_seq_len=16), "k")
    assert max(len(e["input_ids"]) for e in truncated) == 16
    unpacked = tokenize_rows(rows, source, tokenizer, _section(max_seq_len=128), "k")
    packed = pack(unpacked, 128, tokenizer.pad_token_id)
    assert len(packed) < len(unpacked) and {len(e["input_ids"]) for e in packed} == {128}
    assert sum(sum(e["attention_mask"]) for e in packed) == sum(len(e["input_ids"]) for e in unpacked)


def test_pack_and_collate_shapes():
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    assert pack(examples, 6, pad_id=0) == [{"input_ids": [1, 2, 3, 4, 5, 0], "labels": [-100, 2, 3, -100, 5, -100],
                                            "position_ids": [0, 1, 2, 0, 1, 2], "attention_mask": [1, 1, 1, 1, 1, 0]}]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, 5, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize("content, fmt, message", [
    ("", "alpaca", "has no rows"),
    ('{"question": "q", "answer": "a"}\n', "alpaca", r"needs column\(s\) instruction, output"),
    ('{"body": "x"}\n', "text", r"needs column\(s\) text"),
    ('{"instruction": "q", "output": "a"\n', "alpaca", "cannot parse"),
])
def test_bad_data_files(tmp_path, content, fmt, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_rows(DatasetSource(path=str(path), format=fmt), "data.train")


def test_missing_file_and_unknown_bundle():
    with pytest.raises(DataError, match="data.train.path: file 'nope.jsonl' does not exist"):
        load_rows(DatasetSource(path="nope.jsonl", format="text"), "data.train")
    with pytest.raises(DataError, match="not a bundled dataset"):
        load_rows(DatasetSource(path="memft:nothing", format="text"), "data.train")


def test_eval_split_is_held_out(tokenizer):
    data = _section(train=DatasetSource(path="memft:alpaca", format="alpaca", max_examples=100), eval_fraction=0.2)
    splits = build_splits(data, tokenizer, seed=0)
    assert len(splits.train) == 80 and len(splits.eval) == 20


def test_batch_order_resumes_exactly():
    order = BatchOrder(size=10, batch_size=3, seed=1)
    seen = [order.next_indices() for _ in range(5)]
    again = BatchOrder(size=10, batch_size=3, seed=1)
    for _ in range(2):
        again.next_indices()
    state = again.state_dict()
    resumed = BatchOrder(size=10, batch_size=3, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_indices() for _ in range(3)] == seen[2:]
    assert sorted(sum(seen[:3], [])) == sorted(set(sum(seen[:3], [])))  # no repeats within an epoch
    ranks = [BatchOrder(10, 2, seed=1, rank=r, world=2).next_indices() for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
