"""Hostile recipes: each is refused with exit code 2 and one short message naming the file or key and the
fix, never a traceback, never a silent default; limits the model sets are checked by `memft validate`
(from the model's config, no weights) exactly as `memft finetune` checks them."""

import time

import pytest
from transformers import AutoConfig

from memft.errors import RecipeError
from memft.train.models import ASSETS, check_sequence_length
from memft.train.recipe import MAX_YAML_NODES, DataSection


def refused(cli, *args, expected=(), max_chars=2_000) -> str:
    code, out, err = cli(*args)
    assert code == 2, (out, err)
    assert "Traceback" not in err and len(err) < max_chars, err
    for part in expected:
        assert part in err, err
    return err


def test_a_recipe_that_is_not_utf8_is_named_with_the_byte(tmp_path, cli):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"model: {name_or_path: memft:tiny-llama}\n# caf\xe9\n")
    refused(cli, "validate", bad, expected=(f"Recipe file '{bad}' is not UTF-8 text", "byte 0xe9 at offset 45",
                                            "(line 2)"))


def _alias_bomb(levels: int = 8, width: int = 10) -> str:
    lines = ["a0: &a0 [" + ", ".join(['"x"'] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\ntrain: {{max_steps: *a{levels}}}\n"


def test_an_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path, cli):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    start = time.perf_counter()
    refused(cli, "validate", bomb, expected=(f"Recipe file '{bomb}' expands to more than {MAX_YAML_NODES:,} YAML "
                                             "nodes",))
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "x: " + "[" * 5_000 + "]" * 5_000 + "\n"],
                         ids=["recursive-alias", "deep-nesting"])
def test_recursive_and_deeply_nested_yaml_is_refused(tmp_path, cli, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    refused(cli, "validate", path, expected=(f"Recipe file '{path}'",))


def test_a_few_aliases_still_work(tmp_path, cli):
    path = tmp_path / "ok.yaml"
    path.write_text("model: {name_or_path: memft:tiny-llama}\nx: &steps 5\ntrain: {max_steps: *steps}\n")
    code, _, err = cli("validate", path)
    assert code == 2 and "x: unknown key" in err  # the aliases load; only the extra key is refused
    path.write_text("train: &t {max_steps: 5}\n")
    assert cli("validate", path)[0] == 0


def test_quoted_values_and_problem_lists_are_bounded(tmp_path, cli):
    err = refused(cli, "validate", "quickstart", "optimizer.lr=" + "g" * 100_000,
                  expected=("optimizer.lr: Input should be a valid number", "…"))
    assert err.count("g") < 300
    many = tmp_path / "many.yaml"
    many.write_text("".join(f"key{i}: 1\n" for i in range(500)))
    refused(cli, "validate", many, expected=("has 500 problems", "... and 480 more"), max_chars=10_000)
    refused(cli, "validate", "quickstart", "train.max_steps=" + "9" * 5_000,
            expected=("holds a value YAML cannot convert",))


@pytest.mark.parametrize("text", ["", "# only a comment\n", "null\n", "{}\n"], ids=["empty", "comments", "null", "{}"])
def test_an_empty_recipe_is_refused_not_trained_with_defaults(tmp_path, cli, text):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    refused(cli, "validate", path, expected=(f"Recipe file '{path}' is empty", "memft recipes"))
    refused(cli, "finetune", path, f"train.output_dir={tmp_path / 'run'}", expected=("is empty",))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just words\n", "str"), ("3\n", "int")])
def test_a_recipe_that_is_not_a_mapping_is_refused(tmp_path, cli, text, kind):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    refused(cli, "validate", path, expected=(f"Recipe file '{path}' must hold a mapping", f"not a {kind}"))


def test_overrides_alone_on_a_shipped_recipe_are_fine(cli):
    assert cli("validate", "quickstart", "train.max_steps=5")[0] == 0


@pytest.mark.parametrize("command", ["validate", "finetune"])
def test_sequence_length_beyond_the_model_is_refused_by_validate_and_finetune(tmp_path, cli, command):
    refused(cli, command, "quickstart", "data.max_seq_len=100000", f"train.output_dir={tmp_path / 'run'}",
            expected=("data.max_seq_len=100000 exceeds the model's limit of 1024 positions",
                      "Set data.max_seq_len to at most 1024"))


def test_sequence_length_check_works_from_a_config():
    config = AutoConfig.from_pretrained(ASSETS / "tiny-llama")
    check_sequence_length(DataSection(max_seq_len=1024), config)
    with pytest.raises(RecipeError, match="exceeds the model's limit of 1024"):
        check_sequence_length(DataSection(max_seq_len=1025), config)


@pytest.mark.parametrize("command", ["validate", "finetune"])
def test_a_lora_rank_above_the_adapted_layers_is_refused(tmp_path, cli, command):
    start = time.perf_counter()
    refused(cli, command, "lora", "adapter.r=100000", f"train.output_dir={tmp_path / 'run'}",
            expected=("adapter.r=100000", "self_attn.k_proj (weight 64 x 128)", "Set adapter.r to at most 64"))
    assert time.perf_counter() - start < 10 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, ok", [
    (["adapter.r=64"], True),
    (["adapter.r=65", "adapter.target_modules=all-linear"], False),
    (["adapter.r=100", "adapter.target_modules=[q_proj, gate_proj]"], True),   # both are at least 128 wide
    (["adapter.target_modules=[qproj]"], False),
])
def test_lora_rank_limit_follows_the_target_modules(cli, overrides, ok):
    code, _, err = cli("validate", "lora", *overrides)
    assert (code == 0) == ok, err


def test_a_galore_rank_above_every_matrix_is_refused(cli):
    refused(cli, "validate", "galore", "optimizer.rank=100000",
            expected=("optimizer.rank=100000 is above min(m, n) of every matrix GaLore projects",
                      "Set optimizer.rank to at most 128"))
    assert cli("validate", "galore", "optimizer.rank=128")[0] == 0
    refused(cli, "validate", "galore", "optimizer.target_modules=[nothing]",
            expected=("optimizer.target_modules: no linear layer", "q_proj"))
