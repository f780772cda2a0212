"""The support matrix: refused combinations are stopped up front with the reason; the rest validate."""

import pytest

from memft.cli import main
from memft.errors import RecipeError
from memft.train.builders import check_compatibility
from memft.train.recipe import load_recipe
from memft.train.support import ENGINES, REFUSED, matrix_markdown, recipe_rows, rows


def _recipe(*overrides):
    return load_recipe(None, list(overrides))


@pytest.mark.parametrize("row", rows(), ids=lambda r: r.label)
@pytest.mark.parametrize("engine", ENGINES)
def test_every_cell_is_refused_or_accepted_as_the_matrix_says(row, engine):
    recipe = _recipe(*row.overrides, f"distributed.engine={engine}")
    assert row.label in recipe_rows(recipe)
    reason = REFUSED.get(row.label, {}).get(engine)
    if reason is None:
        check_compatibility(recipe)
    else:
        with pytest.raises(RecipeError) as error:
            check_compatibility(recipe)
        assert f"{row.label} is not supported with distributed.engine {engine}" in str(error.value)
        assert reason in str(error.value)


def test_one_process_runs_everything():
    for row in rows():
        check_compatibility(_recipe(*row.overrides))


def test_sharding_engines_refuse_fp16():
    with pytest.raises(RecipeError, match="mixed_precision fp16 is not supported with distributed.engine fsdp"):
        check_compatibility(_recipe("distributed.engine=fsdp", "train.mixed_precision=fp16"))


def test_engine_options_must_match_the_engine():
    with pytest.raises(RecipeError, match="distributed.fsdp options apply to engine 'fsdp' only"):
        _recipe("distributed.engine=ddp", "distributed.fsdp.cpu_offload=true")
    with pytest.raises(RecipeError, match="Did you mean 'offload_optimizer'"):
        _recipe("distributed.engine=deepspeed", "distributed.deepspeed.offload_optimiser=cpu")
    assert _recipe("distributed.engine=deepspeed", "distributed.deepspeed.stage=1").distributed.deepspeed.stage == 1


def test_support_command_prints_the_matrix_and_reasons(capsys):
    assert main(["support"]) == 0
    out = capsys.readouterr().out
    assert matrix_markdown() in out
    assert "| optimizer mezo | yes | no | no |" in out
    assert "optimizer galore_adamw with deepspeed: it projects weight matrices" in out


def test_refused_combination_exits_2_before_starting_processes(capsys, tmp_path):
    code = main(["finetune", "quickstart", "distributed.engine=deepspeed", "optimizer.name=mezo",
                 f"train.output_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "optimizer mezo is not supported with distributed.engine deepspeed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_nproc_needs_an_engine(capsys, tmp_path):
    assert main(["finetune", "quickstart", "--nproc", "2", f"train.output_dir={tmp_path / 'run'}"]) == 2
    assert "distributed.engine is 'none'" in capsys.readouterr().err


def test_a_saved_recipe_with_default_engine_options_validates_again():
    """run.json stores every field; reading it back must not mistake default options for a choice."""
    from memft.train.recipe import validate_recipe

    dump = _recipe().model_dump(mode="json")
    assert validate_recipe(dump).distributed.engine == "none"


def test_started_processes_get_the_command_line_without_nproc():
    from memft.cli import without_nproc

    assert without_nproc(["finetune", "r.yaml", "--nproc", "2", "a=1", "--nproc=4", "--overwrite"]) == [
        "finetune", "r.yaml", "a=1", "--overwrite"]
