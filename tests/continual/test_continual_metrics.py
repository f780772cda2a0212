"""Accuracy-matrix metrics against hand computations, the heatmap, and the task files."""

from __future__ import annotations

import json

import pytest

from memft.continual import (average_accuracy, backward_transfer, continual_metrics, encode_rows, forgetting,
                             forward_transfer, load_task_file, plot_accuracy_matrix, synthetic_suite)
from memft.continual.serialization import load_state, save_state
from memft.errors import DataError

# R[i][j]: accuracy on task j after training task i
R = [[0.9, 0.2, 0.1],
     [0.5, 0.8, 0.3],
     [0.6, 0.4, 0.7]]
BASELINE = [0.1, 0.1, 0.2]


def test_metrics_match_hand_computation():
    assert average_accuracy(R) == pytest.approx((0.6 + 0.4 + 0.7) / 3)
    # BWT over the first T-1 tasks: (0.6 - 0.9 + 0.4 - 0.8) / 2
    assert backward_transfer(R) == pytest.approx(-0.35)
    # forgetting: max over rows 0..T-2 minus last row: (max(0.9, 0.5) - 0.6 + max(0.2, 0.8) - 0.4) / 2
    assert forgetting(R) == pytest.approx(0.35)
    # FWT: (R[0][1] - b1 + R[1][2] - b2) / 2 = (0.2 - 0.1 + 0.3 - 0.2) / 2
    assert forward_transfer(R, BASELINE) == pytest.approx(0.1)
    assert set(continual_metrics(R, BASELINE)) == {"average_accuracy", "bwt", "forgetting", "fwt"}


def test_forgetting_uses_best_earlier_accuracy_not_the_diagonal():
    rows = [[0.2, 0.0], [0.9, 0.5]]   # task 0 improved while training task 1
    assert backward_transfer(rows) == pytest.approx(0.7)
    assert forgetting(rows) == pytest.approx(-0.7)
    assert backward_transfer([[0.4]]) == forgetting([[0.4]]) == forward_transfer([[0.4]], [0.0]) == 0.0


def test_metric_errors():
    with pytest.raises(ValueError, match="square"):
        backward_transfer([[0.1, 0.2]])
    with pytest.raises(ValueError, match="baseline"):
        forward_transfer(R, [0.0])


def test_heatmap_png(tmp_path):
    path = plot_accuracy_matrix(R, ["a", "b", "c"], tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="task_names"):
        plot_accuracy_matrix(R, ["a"], tmp_path / "bad.png")


def test_synthetic_suite_and_task_files(tmp_path, tokenizer):
    tasks = synthetic_suite()
    assert [t.name for t in tasks] == ["animals", "colours", "words", "numbers"]
    for task in tasks:
        train_inputs = {row["input"] for row in task.train}
        assert not train_inputs & {row["input"] for row in task.eval}
    rows = [{"instruction": "Say it.", "input": str(i), "output": "x"} for i in range(10)]
    path = tmp_path / "say.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task_file(path, eval_fraction=0.3)
    assert task.name == "say" and len(task.train) == 7 and len(task.eval) == 3
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x"}\n')
    with pytest.raises(DataError, match="output"):
        load_task_file(tmp_path / "bad.jsonl", eval_path=path)
    with pytest.raises(ValueError, match="unknown task"):
        synthetic_suite(["nope"])


def test_encode_rows_masks_the_prompt(tokenizer):
    row = {"instruction": "Name the first animal.", "input": "otter, heron, lynx", "output": "otter"}
    for fmt in ("alpaca", "compact"):
        [ex] = encode_rows([row], tokenizer, fmt)
        answer = [t for t in ex["labels"] if t != -100]
        assert answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer[:-1]).strip() == "otter"
        assert ex["input_ids"][-len(answer):] == answer
    with pytest.raises(DataError, match="max_seq_len"):
        encode_rows([row], tokenizer, "alpaca", max_seq_len=8)


def test_state_files_round_trip(tmp_path):
    import torch

    state = {"a": torch.arange(6.0).view(2, 3), "nested": [{"b": torch.ones(2, dtype=torch.int64)}, 3, "s"],
             "none": None, "x": 1.5}
    save_state(tmp_path, "s", state)
    back = load_state(tmp_path, "s")
    assert torch.equal(back["a"], state["a"]) and torch.equal(back["nested"][0]["b"], state["nested"][0]["b"])
    assert back["nested"][1:] == [3, "s"] and back["none"] is None and back["x"] == 1.5
    with pytest.raises(TypeError, match="cannot save"):
        save_state(tmp_path, "bad", {"f": object()})
