"""The command line: exit codes, messages without tracebacks, the shipped recipes."""

import argparse
import os
import re
import subprocess
import sys
from importlib.metadata import version
from typing import Literal, get_args, get_origin

import pytest

from memft.cli import build_parser, main
from memft.recipe_files import RECIPES_DIR, shipped_recipes


def memft(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "memft.cli", *args], capture_output=True, text=True, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


def test_recipes_and_validate(capsys):
    assert main(["recipes"]) == 0
    assert "quickstart" in capsys.readouterr().out
    assert main(["validate", "quickstart", "train.max_steps=5"]) == 0
    assert "valid" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["validate", "no_such_recipe"], "neither a file nor a shipped recipe"),
    (["validate", "quickstart", "optimizer.lr=fast"], "optimizer.lr: Input should be a valid number"),
    (["validate", "quickstart", "trian.max_steps=3"], "Did you mean 'train'?"),
    (["finetune", "quickstart", "model.name_or_path=/nonexistent/model", "train.output_dir={tmp}/r"],
     "model.name_or_path: local directory '/nonexistent/model' does not exist"),
    (["finetune", "quickstart", "data.train.path={tmp}/missing.jsonl", "train.output_dir={tmp}/r"],
     "data.train.path: file"),
    (["finetune", "quickstart", "data.max_seq_len=5000", "train.output_dir={tmp}/r"],
     "exceeds the model's limit of 1024"),
])
def test_bad_input_exits_2_with_one_message(tmp_path, capsys, args, message):
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"memft {args[0]}: error:")


def test_the_installed_command_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: {name: galor}\n")
    code, out, err = memft("validate", str(bad))
    assert code == 2 and "Traceback" not in err and "optimizer.name: 'galor' is not a known method" in err


def test_schema_command(capsys):
    assert main(["schema", "train"]) == 0
    assert "train.max_steps" in capsys.readouterr().out


def test_validate_knows_every_recipe_kind(capsys):
    for name, kind in (("quickstart", "finetune"), ("continual", "continual"), ("edit", "edit")):
        assert main(["validate", name]) == 0
        assert f"valid {kind} recipe" in capsys.readouterr().out


def test_a_continual_recipe_is_pointed_to_its_command(capsys):
    assert main(["finetune", "continual"]) == 2
    assert "is a continual recipe (kind: continual); run it with `memft continual continual`" in capsys.readouterr().err
    assert main(["memory", "edit"]) == 2
    assert "run it with `memft edit edit`" in capsys.readouterr().err


def _choice_fields(model, prefix=""):
    """(dotted key, choices) of every choice field of the recipe schema, method sections included."""
    from memft.train.recipe import _members

    for key, field in model.model_fields.items():
        members = _members(field.annotation)
        for member in members:
            yield from _choice_fields(member, f"{prefix}{key}.")
        if not members and key != "name" and get_origin(field.annotation) is Literal:
            yield f"{prefix}{key}", get_args(field.annotation)


def test_schema_lists_the_choices_of_every_choice_field(capsys):
    from memft.train import recipe

    assert main(["schema"]) == 0
    out = capsys.readouterr().out
    fields = set(_choice_fields(recipe.Recipe))
    assert len(fields) > 20 and all(choices for _, choices in fields)
    for key, choices in fields:
        assert f"{key} (one of {', '.join(map(str, choices))}, default" in out
    assert "one of ," not in out
    assert "adapter.target_modules (list[str] | 'all-linear', default" in out
    assert "optimizer.betas (tuple[float, float], default" in out


@pytest.mark.parametrize("command", ["schema", "recipes"])
@pytest.mark.parametrize("buffered", [True, False])
def test_output_cut_short_by_its_reader_ends_quietly(command, buffered):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write, as after `memft schema | head -0`
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run([sys.executable, "-m", "memft.cli", command], stdout=write, stderr=subprocess.PIPE,
                          text=True, env=env)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == ""


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"memft {version('memft')}\n"


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_argument_and_command_has_help():
    missing = []
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if not action.help:
                missing.append(f"{parser.prog}: {action.option_strings or action.dest}")
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{parser.prog} {c.dest}" for c in action._choices_actions if not c.help]
                assert {c.dest for c in action._choices_actions} == set(action.choices)
    assert missing == []


def test_recipes_lists_each_path_with_its_description(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in shipped_recipes():
        path = RECIPES_DIR / f"{name}.yaml"
        description = path.read_text().splitlines()[0].lstrip("# ")
        assert re.search(rf"^{name} +{re.escape(description)}\n +{re.escape(str(path))}$", out, re.M)


def test_recipes_copy_writes_one_to_edit_and_never_overwrites_unasked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shipped = (RECIPES_DIR / "quickstart.yaml").read_text()
    assert main(["recipes", "--copy", "quickstart"]) == 0
    assert (tmp_path / "quickstart.yaml").read_text() == shipped
    assert "Edit it, then: memft finetune quickstart.yaml" in capsys.readouterr().out

    (tmp_path / "mine.yaml").write_text("train: {max_steps: 3}\n")
    assert main(["recipes", "--copy", "quickstart", "mine.yaml"]) == 2
    assert capsys.readouterr().err == ("memft recipes: error: 'mine.yaml' exists already. Pass --force to replace it, "
                                       "or give another DEST.\n")
    assert (tmp_path / "mine.yaml").read_text() == "train: {max_steps: 3}\n"
    assert main(["recipes", "--copy", "quickstart", "mine.yaml", "--force"]) == 0
    assert (tmp_path / "mine.yaml").read_text() == shipped

    (tmp_path / "sub").mkdir()
    assert main(["recipes", "--copy", "continual", "sub"]) == 0
    assert (tmp_path / "sub" / "continual.yaml").is_file()
    assert "memft continual sub/continual.yaml" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--copy", "quikstart"], "--copy: 'quikstart' is not a shipped recipe. Shipped recipes: continual, "),
    (["--copy", "lora", "nodir/x.yaml"], "Cannot write 'nodir/x.yaml': directory 'nodir' does not exist."),
    (["x.yaml"], "DEST 'x.yaml' applies to --copy only"),
    (["--force"], "--force applies to --copy only"),
])
def test_recipes_copy_refuses_bad_input(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", *args]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_hugging_face_key_names_get_memft_keys(capsys):
    assert main(["validate", "quickstart", "learning_rate=2e-5", "train.gradient_accumulation_steps=4"]) == 2
    err = capsys.readouterr().err
    assert "- learning_rate: unknown key. 'learning_rate' is a Hugging Face / LLaMA-Factory name; in memft it is " \
           "optimizer.lr." in err
    assert "- train.gradient_accumulation_steps: unknown key. 'gradient_accumulation_steps' is a Hugging Face / " \
           "LLaMA-Factory name; in memft it is train.grad_accum." in err
