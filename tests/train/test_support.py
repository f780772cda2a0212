"""The support matrix: refused combinations are stopped up front with the reason; the rest validate.

The expected matrix is written out below (not read from memft.train.support), so a cell that changes
in the library, or a method added without a decision for every engine, fails here.
"""

import pytest

from memft.cli import main
from memft.errors import RecipeError
from memft.train.builders import check_compatibility
from memft.train.recipe import load_recipe
from memft.train.support import matrix_markdown, rows, unsupported

ENGINES = ("ddp", "fsdp", "deepspeed")
YES = None
# Refusals, by the words their reason must contain (what goes wrong, and what to use instead).
LAYERWISE = ("before the engine has reduced its gradient", "use optimizer.layerwise false")
GALORE_ZERO = ("ZeRO flattens the parameters", "use engine ddp")
# row label, the overrides that select it, then per engine (ddp, fsdp, deepspeed): YES or the reason words
MATRIX = [
    ("optimizer adamw", ("optimizer.name=adamw",), YES, YES, YES),
    ("optimizer adamw8bit", ("optimizer.name=adamw8bit",),
     YES, ("bitsandbytes", "FSDP2's DTensor shards", "use optimizer adamw"), YES),
    ("optimizer sgd", ("optimizer.name=sgd",), YES, YES, YES),
    ("optimizer mezo", ("optimizer.name=mezo",),
     YES, ("needs no gradients", "sharding buys nothing", "use engine ddp"),
     ("never calls backward", "use engine ddp")),
    ("optimizer galore_adamw", ("optimizer.name=galore_adamw",), YES, YES, GALORE_ZERO),
    ("optimizer galore_adamw8bit", ("optimizer.name=galore_adamw8bit",), YES, YES, GALORE_ZERO),
    ("optimizer galore_adafactor", ("optimizer.name=galore_adafactor",), YES, YES, GALORE_ZERO),
    ("optimizer natural_galore_adamw", ("optimizer.name=natural_galore_adamw",), YES, YES, GALORE_ZERO),
    ("optimizer.layerwise", ("optimizer.name=galore_adamw", "optimizer.layerwise=true"),
     LAYERWISE, LAYERWISE, LAYERWISE),
    ("activations mesa", ("activations.name=mesa",), YES, YES, YES),
    ("activations wta_crs", ("activations.name=wta_crs",), YES, YES, YES),
    ("activations s2a", ("activations.name=s2a",), YES, YES, YES),
    ("loss cut_cross_entropy", ("loss.name=cut_cross_entropy",), YES, YES, YES),
    ("adapter lora", ("adapter.name=lora",), YES, YES, YES),
    ("adapter loram", ("adapter.name=loram",), YES, YES, YES),
    ("adapter loram (quantize nf4)", ("adapter.name=loram", "adapter.quantize=nf4"),
     YES, ("4-bit", "FSDP2 cannot shard", "use engine ddp"), ("4-bit", "ZeRO cannot shard", "use engine ddp")),
]
CELLS = [(label, overrides, engine, reason)
         for label, overrides, *per_engine in MATRIX for engine, reason in zip(ENGINES, per_engine)]


def _recipe(*overrides):
    return load_recipe(None, list(overrides))


def test_the_matrix_has_exactly_the_expected_rows():
    assert [(row.label, row.overrides) for row in rows()] == [(label, overrides) for label, overrides, *_ in MATRIX]


@pytest.mark.parametrize(("label", "overrides", "engine", "reason"), CELLS,
                         ids=[f"{label}-{engine}" for label, _, engine, _ in CELLS])
def test_every_cell_is_accepted_or_refused_with_its_reason(label, overrides, engine, reason):
    recipe = _recipe(*overrides, f"distributed.engine={engine}")
    if reason is YES:
        assert unsupported(recipe) == []
        check_compatibility(recipe)
        return
    with pytest.raises(RecipeError) as error:
        check_compatibility(recipe)
    message = str(error.value)
    assert f"{label} is not supported with distributed.engine {engine}: it " in message
    for words in reason:
        assert words in message, (words, message)


def test_a_recipe_is_told_every_refused_row_at_once():
    problems = unsupported(_recipe("distributed.engine=deepspeed", "optimizer.name=mezo", "adapter.name=loram",
                                   "adapter.quantize=nf4"))
    assert [p.split(" is not supported")[0] for p in problems] == ["optimizer mezo", "adapter loram (quantize nf4)"]
    assert unsupported(_recipe("distributed.engine=ddp", "optimizer.name=mezo", "adapter.name=loram",
                               "adapter.quantize=nf4")) == []


def test_the_printed_matrix_says_yes_or_no_per_cell():
    table = matrix_markdown().splitlines()
    assert table[:2] == ["| method | ddp | fsdp | deepspeed |", "|---|---|---|---|"]
    expected = [f"| {label} | " + " | ".join("yes" if r is YES else "no" for r in per_engine) + " |"
                for label, _, *per_engine in MATRIX]
    assert table[2:] == expected


def test_one_process_runs_everything():
    for label, overrides, *_ in MATRIX:
        recipe = _recipe(*overrides)
        assert unsupported(recipe) == [], label
        check_compatibility(recipe)


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
    assert "| method | ddp | fsdp | deepspeed |" in out
    assert "| optimizer mezo | yes | no | no |" in out
    assert "| optimizer galore_adamw | yes | yes | no |" in out
    assert "| activations mesa | yes | yes | yes |" in out
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
