"""`memft continual` and `memft edit` end to end on memft:tiny-llama (a few steps), and bad recipes: exit
code 2 with one message that names the key or file."""

from __future__ import annotations

import json

import pytest
import torch

from memft.cli import main
from memft.continual.recipe import load_continual_recipe, load_edit_recipe

PNG = b"\x89PNG\r\n\x1a\n"
QUICK = ["train.steps_per_task=3", "train.max_eval_examples=8", "train.device=cpu"]


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_continual_command_writes_results_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["continual", "continual", "tasks.suite=[animals, colours]", *QUICK, f"output_dir={out}"]
    assert main(args) == 0
    assert "BWT" in capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    assert result["method"] == "mora" and result["task_names"] == ["animals", "colours"]
    assert len(result["accuracy"]) == 2 and all(len(row) == 2 for row in result["accuracy"])
    assert set(result["metrics"]) == {"average_accuracy", "bwt", "forgetting", "fwt"}
    assert "| animals |" in (out / "results.md").read_text()
    assert (out / "accuracy.png").read_bytes()[:8] == PNG
    # the run exists: refused without --resume, continued (nothing left to train) with it
    assert main(args) == 2
    assert "already holds a continual checkpoint" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert json.loads((out / "results.json").read_text())["accuracy"] == result["accuracy"]


def test_continual_command_on_task_files(tmp_path, capsys):
    first = [{"instruction": "Repeat.", "input": w, "output": w} for w in ("red", "blue", "grey", "white", "black")]
    second = [{"instruction": "Say yes.", "input": w, "output": "yes"} for w in ("red", "blue", "grey", "white")]
    a, b = _rows(tmp_path / "repeat.jsonl", first), _rows(tmp_path / "yes.jsonl", second)
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"kind: continual\nmethod: {{name: lora, r: 2}}\n"
                      f"tasks:\n  files:\n    - {{train: {a}}}\n    - {{train: {b}, name: agree}}\n"
                      f"  eval_fraction: 0.4\noutput_dir: {tmp_path / 'files'}\n")
    assert main(["continual", str(recipe), *QUICK]) == 2       # 3 training rows, batch 8
    assert "task 'repeat' has 3 training rows, fewer than one batch" in capsys.readouterr().err
    assert main(["continual", str(recipe), *QUICK, "train.batch_size=2"]) == 0
    result = json.loads((tmp_path / "files" / "results.json").read_text())
    assert result["method"] == "lora" and result["task_names"] == ["repeat", "agree"]


def test_edit_command_writes_scores_and_side_memory(tmp_path, capsys, load_tiny, tokenizer):
    edits = [{"prompt": "The capital of Notalo is", "target": " Vozulo", "loc_prompt": "The river Poldra flows",
              "paraphrase": "The capital city of Notalo is"},
             {"prompt": "The flag of Milolo is", "target": " amber", "loc_prompt": "About 12 million people"}]
    path = _rows(tmp_path / "edits.jsonl", edits)
    out = tmp_path / "edit"
    assert main(["edit", "edit", f"edits.path={path}", "edits.limit=null", "wise.n_iter=3", "wise.num_prefixes=1",
                 "device=cpu", f"output_dir={out}"]) == 0
    assert "Rel" in capsys.readouterr().out
    scores = json.loads((out / "scores.json").read_text())
    assert scores["num_edits"] == 2
    for key in ("rel_token", "rel_exact", "gen_token", "gen_exact", "loc_token", "loc_exact"):
        assert 0.0 <= scores[key] <= 1.0       # Gen from the one paraphrase; Loc on loc_prompt
    assert "| Rel |" in (out / "scores.md").read_text()
    assert (out / "wise.safetensors").is_file() and (out / "wise.json").is_file()
    from memft.continual import WISE

    restored = WISE.load(load_tiny().eval(), tokenizer, out)
    assert restored.edit_count == 2 and restored.memory.current_threshold is not None
    assert not torch.equal(restored.memory.current, restored.memory.base)  # the edits are in the memory


@pytest.mark.parametrize("args, message", [
    (["continual", "continual", "method.tua=0.1"], "method.tua: unknown key. Did you mean 'tau'?"),
    (["continual", "continual", "method.name=moar"], "method.name: 'moar' is not a known method"),
    (["continual", "continual", "tasks.suite=[cats]"], "tasks.suite.0: Input should be 'animals'"),
    (["continual", "continual", "method.input_subspace_energy=1.5"], "method.input_subspace_energy: Input should "
                                                                     "be less than 1"),
    (["continual", "continual", "tasks.files=[{train: {tmp}/missing.jsonl}]", "tasks.suite=null",
      "output_dir={tmp}/r"], "tasks.files.0.train: file '{tmp}/missing.jsonl' does not exist"),
    (["continual", "edit"], "has kind 'edit', not 'continual'"),
    (["continual", "quickstart"], "looks like a fine-tuning recipe"),
    (["edit", "edit", "edits.path={tmp}/none.jsonl"], "edits.path: file '{tmp}/none.jsonl' does not exist"),
    (["edit", "edit", "edits.limit=500", "output_dir={tmp}/e"], "edits.limit: asked for 500 edits"),
    (["edit", "edit", "wise.shard_size=3", "wise.merge_every=4"], "wise: merge_every (4) must be a multiple"),
    (["edit", "edit", "wise.mode=vote"], "wise.mode: Input should be 'merge' or 'retrieve'"),
])
def test_bad_recipes_exit_2_with_one_message(tmp_path, capsys, args, message):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"memft {args[0]}: error:") and message.replace("{tmp}", str(tmp_path)) in err
    assert "Traceback" not in err


def test_bad_edit_records_name_the_line(tmp_path, capsys):
    path = _rows(tmp_path / "bad.jsonl", [{"prompt": "p", "target": " t", "loc_prompt": "l"}, {"prompt": "p"}])
    assert main(["edit", "edit", f"edits.path={path}", "edits.limit=null"]) == 2
    err = capsys.readouterr().err
    assert f"edit file '{path}', line 2: missing text field(s) target, loc_prompt" in err


def test_shipped_recipes_validate():
    from memft.recipe_files import RECIPES_DIR

    recipe = load_continual_recipe(RECIPES_DIR / "continual.yaml")
    assert recipe.method.name == "mora" and recipe.method.input_subspace_energy == 0.95
    assert recipe.tasks.suite == ["animals", "colours", "words", "numbers"]
    edit = load_edit_recipe(RECIPES_DIR / "edit.yaml", ["wise.mode=retrieve"])
    assert edit.edits.limit == 10 and edit.wise.mode == "retrieve"
