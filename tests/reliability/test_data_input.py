"""Hostile data files: each is refused with one DataError naming the file, the line or row and what is wrong;
rows dropped or truncated by tokenisation are counted in `Splits.notes`."""

import json

import datasets
import pytest

from memft.cli import main
from memft.errors import DataError
from memft.train.data import HELD_OUT, build_splits, load_rows
from memft.train.models import load_tokenizer
from memft.train.recipe import DataSection, DatasetSource, ModelSection

ROW = json.dumps({"instruction": "Say hi.", "output": "hi"})
SHAPE = 'a list of {"role": ..., "content": ...} objects'


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSection())


def _jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _refused(path, fmt, *expected, **data) -> str:
    """Load and tokenise `path`; return the DataError's message after checking it names the file and `expected`."""
    section = DataSection(train=DatasetSource(path=str(path), format=fmt), eval_fraction=0, **data)
    with pytest.raises(DataError) as info:
        build_splits(section, load_tokenizer(ModelSection()), seed=0)
    message = str(info.value)
    for part in (str(path), *expected):
        assert part in message, message
    assert "\n" not in message
    return message


def _chat(*turns) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


# -------------------------------------------------------------------------------- 1, 3: not UTF-8
@pytest.mark.parametrize("name, fmt, content", [
    ("latin1.jsonl", "alpaca", f"{ROW}\n{ROW}\n".encode() + b'{"instruction": "caf\xe9", "output": "x"}\n'),
    ("utf16.jsonl", "alpaca", f"{ROW}\n{ROW}\n{ROW}\n".encode("utf-16")),
    ("latin1.txt", "text", b"first line\nsecond line\n\xff\xfe third\n"),
    ("latin1.csv", "alpaca", b"instruction,output\na,b\nc,d\ncaf\xe9,x\n"),
])
def test_file_that_is_not_utf8(tmp_path, name, fmt, content):
    (tmp_path / name).write_bytes(content)
    line = "line 1" if name == "utf16.jsonl" else "line 4" if name.endswith(".csv") else "line 3"
    message = _refused(tmp_path / name, fmt, line, "is not UTF-8 text", "Re-save the file as UTF-8")
    assert ("looks like UTF-16" in message) == (name == "utf16.jsonl")


# -------------------------------------------------------------------------------- 2: invalid JSON
def test_invalid_json_line(tmp_path):
    path = _jsonl(tmp_path / "broken.jsonl", [ROW, ROW, '{"instruction": "x", "output": ', ROW])
    _refused(path, "alpaca", "line 3 is not valid JSON", "Expecting value at column 32")


def test_invalid_json_document(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "x", "output": "y"},\n {"instruction": "x", "output": }]\n')
    _refused(path, "alpaca", "is not valid JSON", "Expecting value at line 2, column 33")


# -------------------------------------------------------------------------------- 4: chat shape
@pytest.mark.parametrize("messages, problem", [
    ("hello", "column 'messages' holds a string (\"hello\")"),
    (["hello", "there"], "message 1 of column 'messages' is a string (\"hello\")"),
    ({"role": "user", "content": "hi"}, "column 'messages' holds an object"),
    ([{"role": "user", "content": "hi"}, {"content": "yo"}], "message 2 of column 'messages' has no 'role'"),
    ([{"from": "human", "value": "hi"}], "message 1 of column 'messages' has no 'role'"),
    ([{"role": "user"}], "message 1 of column 'messages' has no 'content'"),
])
def test_chat_messages_of_the_wrong_shape(tmp_path, messages, problem):
    path = _jsonl(tmp_path / "chat.jsonl", [_chat(("user", "hi"), ("assistant", "yo")), {"messages": messages}])
    _refused(path, "chat", "line 2: ", problem, f"format 'chat' needs {SHAPE}")


def test_chat_shape_in_parquet_names_the_row_index(tmp_path):
    path = tmp_path / "chat.parquet"
    rows = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], [{"role": "user"}]]
    datasets.Dataset.from_dict({"messages": rows}).to_parquet(path)
    _refused(path, "chat", "row index 1: message 1 of column 'messages' has no 'content'", SHAPE)


# -------------------------------------------------------------------------------- 5: a directory
@pytest.mark.parametrize("name", ["somedir", "somedir.jsonl"])
def test_directory_as_data_path(tmp_path, name):
    (tmp_path / name).mkdir()
    message = _refused(tmp_path / name, "alpaca", "is a directory", "a data file is needed")
    assert "does not exist" not in message


# -------------------------------------------------------------------------------- 6: value types
@pytest.mark.parametrize("fmt, row, problem", [
    ("alpaca", {"instruction": 7, "output": "x"}, "column 'instruction' holds a number (7)"),
    ("alpaca", {"instruction": "x", "output": ["a", "b"]}, 'column \'output\' holds a list (["a", "b"])'),
    ("alpaca", {"instruction": "x", "input": {"a": 1}, "output": "y"}, "column 'input' holds an object"),
    ("alpaca", {"instruction": "x", "output": None}, "column 'output' is missing or null"),
    ("alpaca", {"instruction": "x"}, "column 'output' is missing or null"),
    ("text", {"text": True}, "column 'text' holds a boolean (true)"),
    ("chat", _chat(("user", 5), ("assistant", "x")), "the 'content' of message 1 of column 'messages' is a number"),
])
def test_values_of_the_wrong_type(tmp_path, fmt, row, problem):
    good = {"alpaca": json.loads(ROW), "text": {"text": "a"}, "chat": _chat(("user", "a"), ("assistant", "b"))}
    path = _jsonl(tmp_path / "mixed.jsonl", [good[fmt], good[fmt], row])
    needed = "a string" if fmt != "chat" or "content" in problem else SHAPE
    _refused(path, fmt, "line 3: ", problem, f"format '{fmt}' needs {needed}")


def test_null_or_absent_input_is_allowed(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "ok.jsonl", [{"instruction": "a", "input": None, "output": "b"},
                                          {"instruction": "c", "output": "d"}])
    splits = build_splits(DataSection(train=DatasetSource(path=path, format="alpaca"), eval_fraction=0), tokenizer, 0)
    assert len(splits.train) == 2


def test_csv_cells_are_text_and_parquet_types_are_checked(tmp_path):
    (tmp_path / "sums.csv").write_text("instruction,input,output\nAdd.,1 + 2,3\nAdd.,,5\n")
    rows = load_rows(DatasetSource(path=str(tmp_path / "sums.csv"), format="alpaca"), "data.train")
    assert rows["output"] == ["3", "5"] and rows["input"] == ["1 + 2", None]
    datasets.Dataset.from_dict({"instruction": ["a", "b"], "output": [1, 2]}).to_parquet(tmp_path / "n.parquet")
    _refused(tmp_path / "n.parquet", "alpaca", "row index 0: column 'output' holds a number (1)")


def test_column_whose_type_changes_is_named_when_datasets_cannot_load_it(tmp_path):
    # `datasets` reads JSON Lines in 10 MB blocks and cannot merge a block of numbers with one of strings.
    path = tmp_path / "meta.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": "x" * 200, "meta": 5}) + "\n" for _ in range(60_000))
        f.write(json.dumps({"text": "y", "meta": "five"}) + "\n")
    with pytest.raises(DataError) as info:
        load_rows(DatasetSource(path=str(path), format="text"), "data.train")
    message = str(info.value)
    assert str(path) in message and "column 'meta' holds a number at line 1 but a string at line 60001" in message


# -------------------------------------------------------------------------------- 7: no assistant turn
def test_chat_without_assistant_turns(tmp_path):
    path = _jsonl(tmp_path / "users.jsonl", [_chat(("user", "hi")), _chat(("system", "s"), ("user", "yo"))])
    message = _refused(path, "chat", "no row of", "role 'assistant'", "data.loss_on=all")
    assert "max_seq_len" not in message


def test_chat_truncated_past_every_assistant_turn_keeps_the_max_seq_len_advice(tmp_path):
    path = _jsonl(tmp_path / "long.jsonl", [_chat(("user", "word " * 60), ("assistant", "yo"))] * 2)
    message = _refused(path, "chat", "data.max_seq_len=16", "Raise max_seq_len", max_seq_len=16)
    assert "role 'assistant'" not in message


# -------------------------------------------------------------------------------- 8: the held-out split
def test_error_in_the_held_out_split_does_not_blame_data_eval(tmp_path, tokenizer):
    held_out = datasets.Dataset.from_dict({"i": list(range(10))}).train_test_split(test_size=0.1, seed=0)["test"]["i"]
    rows = [_chat(("user", "hi")) if i in held_out else _chat(("user", "hi"), ("assistant", "yo")) for i in range(10)]
    path = _jsonl(tmp_path / "chat.jsonl", rows)
    data = DataSection(train=DatasetSource(path=path, format="chat"), eval_fraction=0.1)
    with pytest.raises(DataError) as info:
        build_splits(data, tokenizer, seed=0)
    message = str(info.value)
    assert message.startswith(f"{HELD_OUT}: no row of '{path}' has a message with role 'assistant'")
    assert "data.eval:" not in message and HELD_OUT == "the held-out split (data.eval_fraction of data.train)"


# -------------------------------------------------------------------------------- 9: counts
def test_rows_dropped_and_truncated_are_counted(tokenizer):
    data = DataSection(train=DatasetSource(path="memft:alpaca", format="alpaca"), max_seq_len=30, eval_fraction=0)
    splits = build_splits(data, tokenizer, seed=0)
    assert len(splits.train) == 248
    assert splits.notes == ["data.train: 1,252 of 1,500 rows dropped: no trainable token within data.max_seq_len=30 "
                            "(raise data.max_seq_len); 248 rows truncated to data.max_seq_len=30."]


def test_chat_counts_name_each_reason_and_the_held_out_split(tmp_path, tokenizer):
    rows = [_chat(("user", "hi"), ("assistant", "yo")), _chat(("user", "hi")),
            _chat(("user", "word " * 40), ("assistant", "yo")), _chat(("user", "hi"), ("assistant", "word " * 40))]
    path = _jsonl(tmp_path / "chat.jsonl", rows)
    splits = build_splits(DataSection(train=DatasetSource(path=path, format="chat"), max_seq_len=24,
                                      eval_fraction=0), tokenizer, seed=0)
    assert len(splits.train) == 2
    assert splits.notes == ["data.train: 2 of 4 rows dropped: 1 with no assistant message, 1 with no trainable token "
                            "within data.max_seq_len=24 (raise data.max_seq_len); 1 row truncated to "
                            "data.max_seq_len=24."]
    clean = DataSection(train=DatasetSource(path="memft:alpaca", format="alpaca", max_examples=100), max_seq_len=512)
    assert build_splits(clean, tokenizer, seed=0).notes == [
        "data.train: 95 rows read, none dropped or truncated.",
        f"{HELD_OUT}: 5 rows read, none dropped or truncated."]


# -------------------------------------------------------------------------------- through the CLI
@pytest.mark.parametrize("case", ["not-utf8", "directory"])
def test_cli_reports_one_paragraph_and_exit_code_2(tmp_path, capsys, case):
    if case == "directory":
        path = tmp_path / "data.jsonl"
        path.mkdir()
    else:
        path = tmp_path / "data.jsonl"
        path.write_bytes(f"{ROW}\n".encode() + b'{"instruction": "\xff\xfe", "output": "x"}\n')
    code = main(["finetune", "quickstart", f"data.train.path={path}", "data.train.format=alpaca",
                 f"train.output_dir={tmp_path}/run", "train.device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("memft finetune: error: data.train.path: ") and str(path) in err
    assert ("line 2 is not UTF-8 text" if case == "not-utf8" else "is a directory") in err
