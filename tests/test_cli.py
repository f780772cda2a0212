"""The command line: exit codes, messages without tracebacks, the shipped recipes."""

import subprocess
import sys

import pytest

from memft.cli import main


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
