"""Data sources beyond one file (folders, globs, save_to_disk folders, datasets.load_dataset), several sources
mixed by weight, a chat template of the recipe's own, and a run length in epochs: each works, is described in
the run's notes, and is refused with the recipe key and the fix when it cannot work."""

from __future__ import annotations

import json
import math

import datasets
import pytest

from memft.errors import DataError, RecipeError
from memft.train.data import IGNORE_INDEX, build_splits, load_rows, with_run_length
from memft.train.data.mixing import shares
from memft.train.loop import finetune
from memft.train.models import load_tokenizer
from memft.train.recipe import DataSection, DatasetSource, ModelSection, load_recipe, validate_recipe
from tests.conftest import tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSection())


def _alpaca(n: int, tag: str) -> list[dict]:
    return [{"instruction": f"Name {tag} {i}.", "output": f"{tag}{i}"} for i in range(n)]


def _jsonl(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _refused(source: DatasetSource, *expected: str) -> str:
    with pytest.raises(DataError) as info:
        load_rows(source, "data.train")
    message = str(info.value)
    for part in expected:
        assert part in message, message
    return message


# ------------------------------------------------------------------------------------- folders and globs
def test_a_folder_reads_the_data_files_in_it_and_a_glob_those_it_matches(tmp_path, tokenizer):
    _jsonl(tmp_path / "d" / "a.jsonl", _alpaca(3, "a"))
    _jsonl(tmp_path / "d" / "b.jsonl", _alpaca(2, "b"))
    _jsonl(tmp_path / "d" / "more" / "c.jsonl", _alpaca(4, "c"))
    (tmp_path / "d" / "README.md").write_text("# not data\n")
    folder = load_rows(DatasetSource(path=str(tmp_path / "d"), format="alpaca"), "data.train")
    assert sorted(folder["output"]) == ["a0", "a1", "a2", "b0", "b1"]
    nested = load_rows(DatasetSource(path=str(tmp_path / "d" / "**" / "*.jsonl"), format="alpaca"), "data.train")
    assert len(nested) == 9
    data = DataSection(train=DatasetSource(path=str(tmp_path / "d"), format="alpaca"), eval_fraction=0)
    assert build_splits(data, tokenizer, seed=0).notes == ["data.train: 5 rows read, none dropped or truncated."]


def test_a_glob_of_csv_files_reads_them_as_text(tmp_path):
    for name, rows in (("x.csv", "Add.,1 + 2,3\n"), ("y.csv", "Add.,,5\nSub.,3 - 1,2\n")):
        (tmp_path / name).write_text("instruction,input,output\n" + rows)
    rows = load_rows(DatasetSource(path=str(tmp_path / "*.csv"), format="alpaca"), "data.train")
    assert rows["output"] == ["3", "5", "2"]


def test_a_bad_row_in_a_folder_names_its_file_and_line(tmp_path):
    _jsonl(tmp_path / "d" / "a.jsonl", _alpaca(3, "a"))
    bad = _jsonl(tmp_path / "d" / "b.jsonl", [_alpaca(1, "b")[0], {"instruction": "x", "output": 7}])
    _refused(DatasetSource(path=str(tmp_path / "d"), format="alpaca"),
             f"data.train.path: '{bad}' line 2: column 'output' holds a number (7)")


@pytest.mark.parametrize("files, expected", [
    ({"a.jsonl": '{"text": "x"}\n', "b.csv": "text\ny\n"}, "holds files of several formats: json ("),
    ({"a.csv": "text\nx\n", "b.csv": "body\ny\n"}, "the CSV files of one source need the same header"),
    ({}, "is a directory without data files in it, so a data file is needed"),
    ({"sub/a.jsonl": '{"text": "x"}\n'}, "Its data files are in subfolders: use a glob such as"),
])
def test_folders_that_cannot_be_one_source(tmp_path, files, expected):
    (tmp_path / "d").mkdir()
    for name, content in files.items():
        (tmp_path / "d" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "d" / name).write_text(content)
    _refused(DatasetSource(path=str(tmp_path / "d"), format="text"), "data.train.path: ", expected)


def test_globs_that_match_nothing_or_other_files(tmp_path):
    _refused(DatasetSource(path=str(tmp_path / "*.jsonl"), format="text"), "data.train.path: no file matches")
    (tmp_path / "notes.md").write_text("x")
    _refused(DatasetSource(path=str(tmp_path / "*"), format="text"), "which is not a data file", "Narrow the pattern")


# ---------------------------------------------------------------------------------------- save_to_disk
def test_a_save_to_disk_folder_and_one_split_of_a_saved_dataset_dict(tmp_path, tokenizer):
    datasets.Dataset.from_list(_alpaca(4, "s")).save_to_disk(tmp_path / "one")
    assert load_rows(DatasetSource(path=str(tmp_path / "one"), format="alpaca"), "data.train")["output"][0] == "s0"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_alpaca(6, "t")),
                          "test": datasets.Dataset.from_list(_alpaca(2, "v"))}).save_to_disk(tmp_path / "dict")
    data = DataSection(train=DatasetSource(path=str(tmp_path / "dict"), format="alpaca"),
                       eval=DatasetSource(path=str(tmp_path / "dict"), format="alpaca", split="test"), max_seq_len=64)
    splits = build_splits(data, tokenizer, seed=0)
    assert (len(splits.train), len(splits.eval)) == (6, 2)
    assert splits.notes == ["data.train: 6 rows read, none dropped or truncated.",
                            "data.eval: 2 rows read, none dropped or truncated."]
    _refused(DatasetSource(path=str(tmp_path / "dict"), format="alpaca", split="validation"),
             "data.train.split: 'validation' is not a split of", "splits train, test")


def test_a_saved_dataset_with_a_bad_row_names_the_row(tmp_path):
    datasets.Dataset.from_dict({"instruction": ["a", "b"], "output": ["x", None]}).save_to_disk(tmp_path / "s")
    _refused(DatasetSource(path=str(tmp_path / "s"), format="alpaca"),
             "row index 1: column 'output' is missing or null")


# --------------------------------------------------------------------------------------- load_dataset
def test_load_dataset_with_a_builder_and_data_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _jsonl(tmp_path / "parts" / "a.jsonl", _alpaca(3, "a"))
    _jsonl(tmp_path / "parts" / "b.jsonl", _alpaca(2, "b"))
    source = DatasetSource(path="json", data_files=["parts/a.jsonl", "parts/b.jsonl"], format="alpaca")
    assert load_rows(source, "data.train")["output"] == ["a0", "a1", "a2", "b0", "b1"]
    _refused(DatasetSource(path="json", data_files="parts/*.jsonl", split="validation", format="alpaca"),
             "data.train.split: ", 'Unknown split "validation"')
    _refused(DatasetSource(path="json", data_files="other/*.jsonl", format="alpaca"),
             "data.train.data_files: ", "finds no such data")


def test_load_dataset_chooses_a_configuration_by_name(tmp_path):
    _jsonl(tmp_path / "repo" / "small" / "x.jsonl", _alpaca(2, "s"))
    _jsonl(tmp_path / "repo" / "large" / "x.jsonl", _alpaca(5, "l"))
    (tmp_path / "repo" / "README.md").write_text("---\nconfigs:\n- config_name: small\n  data_files: small/x.jsonl\n"
                                                 "- config_name: large\n  data_files: large/x.jsonl\n---\n")
    repo = str(tmp_path / "repo")
    assert len(load_rows(DatasetSource(path=repo, name="large", format="alpaca"), "data.train")) == 5
    _refused(DatasetSource(path=repo, name="medium", format="alpaca"), "data.train.name: ", "'medium' not found")


def test_a_hub_id_while_offline_names_the_key_and_the_fix():
    assert datasets.config.HF_HUB_OFFLINE  # tests/conftest.py: nothing is downloaded
    _refused(DatasetSource(path="someone/some-data", format="text"),
             "data.train.path: 'someone/some-data' is not a local file or folder", "HF_HUB_OFFLINE",
             "save_to_disk", "point data.train.path at that folder")


def test_a_hub_that_does_not_answer_is_called_offline(monkeypatch):
    def unreachable(path, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    message = _refused(DatasetSource(path="someone/some-data", format="text"), "this machine looks offline")
    assert "HF_HUB_OFFLINE" not in message


def test_a_hub_id_fails_at_once_when_the_hub_does_not_answer(monkeypatch):
    """Without HF_HUB_OFFLINE, a hub that does not answer memft's quick probe sends `datasets` to its cache only:
    no retries, the offline message at once."""
    import time

    import memft.train.models as models

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "hub_reachable", lambda endpoint: False)
    start = time.perf_counter()
    message = _refused(DatasetSource(path="someone/some-data", format="text"), "this machine looks offline")
    assert time.perf_counter() - start < 5 and "HF_HUB_OFFLINE" not in message
    assert datasets.config.HF_HUB_OFFLINE is False  # restored


def test_load_dataset_options_on_a_bundled_set_are_refused():
    with pytest.raises(RecipeError, match="name and data_files are options of datasets.load_dataset"):
        load_recipe(None, ["data.train={path: 'memft:text', format: text, data_files: x.jsonl}"])


# ----------------------------------------------------------------------------------------------- mixing
MIX = [{"path": "memft:alpaca", "format": "alpaca", "max_examples": 40, "weight": 3},
       {"path": "memft:text", "format": "text", "max_examples": 10, "weight": 1}]


def _from_text(example: dict) -> bool:
    return example["labels"][0] != IGNORE_INDEX  # text trains on every token, alpaca not on its prompt


def test_shares_round_by_largest_remainder():
    assert shares(50, [3, 1]) == [38, 12]  # 37.5 and 12.5: the tie goes to the earlier source
    assert shares(10, [0.2, 0.2, 0.6]) == [2, 2, 6]
    assert shares(7, [1, 1, 1]) == [3, 2, 2]


def test_sources_are_mixed_by_weight_deterministically_from_the_seed(tokenizer):
    data = DataSection(mix=MIX, eval_fraction=0, max_seq_len=128)
    splits = build_splits(data, tokenizer, seed=0)
    assert splits.notes == [
        "data.mix.0: 40 rows read, none dropped or truncated.",
        "data.mix.1: 10 rows read, none dropped or truncated.",
        "data.mix: 50 training examples mixed by weight: data.mix.0 (weight 3) gives 38 of its 40 examples; "
        "data.mix.1 (weight 1) gives 12: each of its 10 examples once, 2 of them twice."]
    assert sum(map(_from_text, splits.train)) == 12 and len(splits.train) == 50
    assert build_splits(data, tokenizer, seed=0).train == splits.train
    assert build_splits(data, tokenizer, seed=1).train != splits.train


def test_mixed_sources_hold_out_their_eval_rows_before_mixing(tokenizer):
    data = DataSection(mix=MIX, eval_fraction=0.2, max_seq_len=128)
    splits = build_splits(data, tokenizer, seed=0)
    assert splits.notes[3:] == ["the held-out split (data.eval_fraction of data.mix.0): 8 rows read, none dropped "
                                "or truncated.", "the held-out split (data.eval_fraction of data.mix.1): 2 rows "
                                "read, none dropped or truncated."]
    trained = {tuple(ex["input_ids"]) for ex in splits.train}
    assert len(splits.eval) == 10 and not trained & {tuple(ex["input_ids"]) for ex in splits.eval}


def test_mixing_then_packing(tokenizer):
    data = DataSection(mix=MIX, eval_fraction=0, max_seq_len=128, packing=True)
    splits = build_splits(data, tokenizer, seed=0)
    assert splits.notes[-1].startswith("data.mix: 50 examples packed into ")
    assert sum(row["position_ids"].count(0) for row in splits.train) == 50


@pytest.mark.parametrize("data, expected", [
    ({"train": {"path": "memft:text", "format": "text"}, "mix": MIX}, "data.train and data.mix both give"),
    ({"mix": MIX[:1]}, "data.mix mixes several sources, but it has 1"),
    ({"mix": [MIX[0], {**MIX[1], "weight": 0}]}, "data.mix.1.weight: Input should be greater than 0"),
    ({"mix": [MIX[0], {**MIX[1], "wieght": 1}]}, "data.mix.1.wieght: unknown key. Did you mean 'weight'?"),
    ({"train": None}, "data.train is null"),
])
def test_mix_recipes_that_cannot_work(data, expected):
    with pytest.raises(RecipeError, match=expected):
        validate_recipe({"data": data})


def test_a_mix_recipe_survives_its_own_dump():
    recipe = validate_recipe({"data": {"mix": MIX}})
    assert recipe.data.train is None
    assert validate_recipe(recipe.model_dump(mode="json")) == recipe


def test_a_weight_too_small_to_give_an_example_is_refused(tokenizer):
    data = DataSection(mix=[MIX[0], {**MIX[1], "weight": 0.001}], eval_fraction=0, max_seq_len=128)
    with pytest.raises(DataError, match=r"data.mix.1.weight: 0.001 gives this source no example"):
        build_splits(data, tokenizer, seed=0)


# ----------------------------------------------------------------------------------------- chat template
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
CHAT = [{"messages": [{"role": "user", "content": "Capital of Kalo?"}, {"role": "assistant", "content": "Ri."}]}]


def _chat_splits(tmp_path, tokenizer, template):
    data = DataSection(train=DatasetSource(path=_jsonl(tmp_path / "chat.jsonl", CHAT), format="chat"),
                       eval_fraction=0, max_seq_len=64, chat_template=template)
    return build_splits(data, tokenizer, seed=0)


@pytest.mark.parametrize("in_file", [False, True])
def test_a_chat_template_of_the_recipe_renders_the_rows(tmp_path, tokenizer, in_file):
    template = TEMPLATE
    if in_file:
        (tmp_path / "chat.jinja").write_text(TEMPLATE)
        template = str(tmp_path / "chat.jinja")
    example = _chat_splits(tmp_path, tokenizer, template).train[0]
    assert tokenizer.decode(example["input_ids"]) == "[user] Capital of Kalo?\n[assistant] Ri.\n"
    assert tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX]) == " Ri.\n"  # " Ri": one token
    own = _chat_splits(tmp_path, tokenizer, None).train[0]
    assert "<|user|>" in tokenizer.decode(own["input_ids"])


@pytest.mark.parametrize("template, expected", [
    ("missing.jinja", "data.chat_template: file 'missing.jinja' does not exist"),
    ("{% for m in messages %}{{ m['content'] }}", "data.chat_template: the template cannot render a user and an "
                                                  "assistant message: Unexpected end of template"),
    ("chatml", "data.chat_template: the template does not write the messages' content"),
])
def test_chat_templates_that_cannot_work(tmp_path, tokenizer, template, expected):
    with pytest.raises(DataError, match=expected):
        _chat_splits(tmp_path, tokenizer, template)


def test_a_chat_template_without_chat_data_is_refused():
    with pytest.raises(RecipeError, match="data.chat_template renders format 'chat', but no data source"):
        load_recipe(None, ["data.chat_template=x.jinja"])


# -------------------------------------------------------------------------------------------- epochs
def test_epochs_become_steps(tmp_path):
    recipe = load_recipe(None, ["train.num_epochs=2.5", "train.batch_size=4", "train.grad_accum=3"])
    assert recipe.train.max_steps is None
    resolved, notes = with_run_length(recipe, 103, world=1)
    assert (resolved.train.max_steps, resolved.train.num_epochs) == (21, None)  # ceil(2.5 x 25 / 3)
    assert notes == ["train.num_epochs=2.5: an epoch of 103 training examples is 25 micro-batches of 4 "
                     "(train.batch_size=4 x 1 process), so the run is 21 optimizer steps of train.grad_accum=3 "
                     "micro-batches."]
    assert with_run_length(recipe, 103, world=2)[0].train.max_steps == 10  # 12 micro-batches of 8 an epoch
    tenth = load_recipe(None, ["train.num_epochs=0.1", "train.batch_size=8"])
    assert with_run_length(tenth, 240, world=1)[0].train.max_steps == 3  # 0.1 x 30 exactly, not 3.0000000000000004
    assert with_run_length(load_recipe(None, ["train.max_steps=7"]), 103, world=1) == (
        load_recipe(None, ["train.max_steps=7"]), [])


@pytest.mark.parametrize("overrides, expected", [
    (["train.max_steps=5", "train.num_epochs=2"], "train.max_steps=5 and train.num_epochs=2 both set the run's "
                                                   "length; keep one"),
    (["train.max_steps=null"], "train.max_steps is null and train.num_epochs is not set"),
])
def test_run_lengths_that_cannot_work(overrides, expected):
    with pytest.raises(RecipeError, match=expected):
        load_recipe(None, overrides)


def test_a_run_in_epochs_runs_its_steps_and_resumes_with_more_epochs(tmp_path, capsys, tokenizer):
    epochs = {"max_steps": None, "num_epochs": 1, "lr_schedule": "linear", "eval_batches": 1}
    recipe = tiny_recipe(tmp_path / "run", train=epochs)
    validated = validate_recipe(recipe)
    steps = len(build_splits(validated.data, tokenizer, validated.train.seed).train) // 4  # batches of 4
    result = finetune(validated)
    assert result.steps == steps and len(result.losses) == steps
    assert f"so the run is {steps} optimizer steps" in capsys.readouterr().err
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if "lr" in json.loads(line)][-1]
    assert last["step"] == steps and last["lr"] == 0.0  # the linear schedule ends at the resolved length
    saved = json.loads((tmp_path / "run" / "run.json").read_text())["recipe"]
    assert (saved["train"]["max_steps"], saved["train"]["num_epochs"]) == (steps, None)
    longer = tiny_recipe(tmp_path / "run", train={**epochs, "num_epochs": 1.5})
    assert finetune(validate_recipe(longer), resume=True).steps == math.ceil(1.5 * steps)


# ------------------------------------------------------------------------------------ validate and schema
def test_validate_reads_every_source_as_a_run_does(cli, tmp_path):
    recipe = tiny_recipe(tmp_path / "run")
    del recipe["data"]["train"]
    recipe["data"]["mix"] = MIX
    path = write_recipe(tmp_path / "mix.yaml", recipe)
    code, out, err = cli("validate", path)
    assert code == 0, err
    assert "training examples mixed by weight: data.mix.0 (weight 3) gives" in out
    missing = str(tmp_path / "missing.jsonl")
    for command in ("validate", "finetune"):
        code, _, err = cli(command, path, f"data.mix=[{json.dumps(MIX[0])}, {{path: '{missing}', format: text, "
                                          "weight: 1}]")
        assert code == 2 and "Traceback" not in err
        assert f"data.mix.1.path: file '{missing}' does not exist" in err


def test_every_new_key_is_in_the_schema_with_help(cli):
    code, out, _ = cli("schema")
    assert code == 0
    help_of = {line.split(" ", 1)[0].rstrip(":"): line.split(": ", 1)[1] for line in out.splitlines() if ": " in line}
    for key in ("data.train.name", "data.train.data_files", "data.mix", "data.mix.weight", "data.chat_template",
                "data.packing", "train.num_epochs"):
        assert len(help_of[key]) > 40, key
