"""`memft continual` on the fine-tuning loop's path: the recipe's optimizer and loss sections (GaLore, MeZO, cut
cross-entropy) train a continual method through memft.train.step, only the method's trainable parameters are
optimised, and the combinations a method cannot train with are refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch

from memft.cli import main
from memft.continual import build_method, run_task_sequence, synthetic_suite
from memft.continual.harness import TrainableView
from memft.continual.recipe import load_continual_recipe, step_recipe
from memft.errors import RecipeError
from memft.train.builders import build_optimizer

TINY = """\
kind: continual
model:
  name_or_path: memft:tiny-llama
method:
  name: lora
  r: 4
tasks:
  suite: [animals, colours]
train:
  steps_per_task: 6
  batch_size: 8
  prompt_format: compact
  max_eval_examples: 8
  device: cpu
optimizer:
  name: adamw
  lr: 5.0e-3
output_dir: {out}
"""
TRAIN = {"steps_per_task": 4, "batch_size": 8, "prompt_format": "compact", "max_eval_examples": 8}


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(out=tmp_path / "run"))
    return path


def _run(recipe, *overrides) -> dict:
    assert main(["continual", str(recipe), *overrides]) == 0
    return json.loads((recipe.parent / "run" / "results.json").read_text())


def _falls(losses: list[float]) -> bool:
    return sum(losses[-3:]) / 3 < losses[0]


@pytest.mark.parametrize("overrides", [
    ["optimizer.name=galore_adamw", "optimizer.rank=2", "optimizer.lr=2e-2"],
    ["method.name=mora", "optimizer.name=galore_adamw", "optimizer.rank=4", "optimizer.lr=2e-2",
     "optimizer.layerwise=true"],
], ids=["lora", "mora, layer-wise"])
def test_continual_command_trains_with_galore(recipe, overrides):
    result = _run(recipe, *overrides)
    assert len(result["losses"]) == 2 and all(len(task) == 6 for task in result["losses"])
    assert all(_falls(task) for task in result["losses"]), result["losses"]


def test_continual_command_trains_with_cut_cross_entropy(recipe, monkeypatch):
    import memft.losses.patch as patch

    calls = []
    original = patch.cut_cross_entropy_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(patch, "cut_cross_entropy_loss", counting)
    for method in ("lora", "mora"):  # their loss is the model's own, from labels: every training step runs CCE
        calls.clear()
        result = _run(recipe, f"method.name={method}", "loss.name=cut_cross_entropy", "--overwrite")
        assert len(calls) == 2 * 6   # training steps only: evaluation passes no labels
        assert all(_falls(task) for task in result["losses"]), result["losses"]


def test_continual_command_trains_with_mezo(recipe):
    result = _run(recipe, "optimizer.name=mezo", "optimizer.lr=3e-3", "optimizer.eps=1e-2", "optimizer.n_samples=4",
                  "train.steps_per_task=8")
    assert all(len(task) == 8 for task in result["losses"])
    assert _falls(result["losses"][0]), result["losses"]


def test_cut_cross_entropy_gives_the_same_loss_and_is_undone(load_tiny, tokenizer):
    tasks = synthetic_suite(["animals"])
    plain = run_task_sequence(load_tiny(), tokenizer, tasks, "lora", {"r": 4}, {**TRAIN, "steps_per_task": 2})
    model = load_tiny()
    cut = run_task_sequence(model, tokenizer, tasks, "lora", {"r": 4}, {**TRAIN, "steps_per_task": 2},
                            loss={"name": "cut_cross_entropy"})
    assert cut.losses[0] == pytest.approx(plain.losses[0], rel=1e-4)
    assert "forward" not in vars(model)  # the patch is undone when the sequence ends


@pytest.mark.parametrize("method, options", [("lora", {"r": 4}), ("ilora", {"r": 4}), ("mora", None)])
@pytest.mark.parametrize("optimizer", [{"name": "adamw", "weight_decay": 0.1}, {"name": "galore_adamw", "rank": 2},
                                       {"name": "mezo"}], ids=["adamw", "galore", "mezo"])
def test_only_the_methods_parameters_are_optimised(micro_llama, method, options, optimizer):
    from memft.continual.recipe import loss_section, optimizer_section

    cl = build_method(method, options)
    model = cl.attach(micro_llama())
    cl.begin_task(0)
    if method != "lora":  # whatever else requires grad is left out (sequential LoRA trains what requires grad)
        for p in model.parameters():
            p.requires_grad_(True)
    view = TrainableView(model, cl.trainable_parameters())
    plan = build_optimizer(view, step_recipe(optimizer_section(optimizer), loss_section(), 1.0))
    optimised = [p for group in plan.optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, optimised)) == sorted(map(id, cl.trainable_parameters()))
    assert [id(p) for p in view.parameters()] == [id(p) for p in cl.trainable_parameters()]
    if optimizer["name"] == "galore_adamw":  # the default targets project every adapter matrix (q_proj, ...)
        projected = [p for group in plan.optimizer.param_groups if "rank" in group for p in group["params"]]
        assert len(projected) == len(optimised)
    view.train(False)
    assert not model.training


def test_mezo_changes_only_the_adapter_and_mora_with_dropout_records_inputs(load_tiny, tokenizer):
    model = load_tiny()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    tasks = synthetic_suite(["animals", "colours"])
    run_task_sequence(model, tokenizer, tasks, "lora", {"r": 4}, TRAIN, optimizer={"name": "mezo", "lr": 1e-3})
    for name, param in model.named_parameters():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if ".lora_" in name:
            assert key not in base
        else:
            assert torch.equal(param, base[key]), name
    mora = build_method("mora", {"input_subspace_energy": 0.95})
    run_task_sequence(load_tiny(), tokenizer, tasks, mora, None, TRAIN,
                      optimizer={"name": "mezo", "lr": 1e-3, "dropout": True})
    assert all(layer.input_basis.shape[1] > 0 for _, layer in mora.layers())  # train-mode passes recorded inputs


def test_layerwise_galore_leaves_no_hooks_behind(load_tiny, tokenizer):
    cl = build_method("ilora", {"r": 4, "replay_batch_size": 4})
    result = run_task_sequence(load_tiny(), tokenizer, synthetic_suite(["animals", "colours"]), cl, None, TRAIN,
                               optimizer={"name": "galore_adamw", "rank": 2, "lr": 1e-2, "layerwise": True})
    assert all(torch.isfinite(torch.tensor(task)).all() for task in result.losses)
    assert not any(p._post_accumulate_grad_hooks for p in cl.trainable_parameters())


@pytest.mark.parametrize("overrides, message", [
    (["train.lr=5e-3"], "train.lr moved to the optimizer section (the fine-tuning recipe's): write optimizer.lr"),
    (["method.name=ilora", "optimizer.name=mezo"], "optimizer mezo runs the loss 2 x n_samples times per step at "
                                                   "perturbed weights, but I-LoRA's loss draws a replay batch"),
    (["method.name=ilora", "loss.name=cut_cross_entropy"], "loss cut_cross_entropy replaces the loss the model "
                                                           "computes from labels, but I-LoRA computes its "
                                                           "cross-entropies itself"),
    (["method.name=mora", "method.input_subspace_energy=0.95", "optimizer.name=mezo"],
     "MoRA records no inputs of the task, so method.input_subspace_energy would protect nothing; set "
     "optimizer.dropout true"),
    (["optimizer.name=galore_adamw"], "optimizer.rank=128 is above method.r=4"),
    (["optimizer.name=mezo", "model.gradient_checkpointing=true"], "optimizer mezo runs no backward"),
    (["optimizer.rnak=2", "optimizer.name=galore_adamw"], "optimizer.rnak: unknown key. Did you mean 'rank'?"),
])
def test_refused_combinations_exit_2_with_the_reason(recipe, capsys, overrides, message):
    assert main(["continual", str(recipe), *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_optimizer_section_and_its_defaults():
    recipe = load_continual_recipe(None)
    assert (recipe.optimizer.name, recipe.optimizer.lr, recipe.optimizer.weight_decay) == ("adamw", 2e-3, 0.0)
    assert recipe.loss.name == "cross_entropy"
    # A section the recipe gives means what it means in a fine-tuning recipe: the same defaults.
    from memft.train.recipe import validate_recipe
    for overrides in (["optimizer.weight_decay=0.1"], ["optimizer.name=galore_adamw", "optimizer.rank=8"]):
        given = load_continual_recipe(None, overrides).optimizer
        section = dict(o.split("=", 1) for o in overrides)
        finetune = validate_recipe({"optimizer": {k.split(".")[1]: v for k, v in section.items()}}).optimizer
        assert given.lr == finetune.lr and given.name == finetune.name
    from memft.recipe_files import RECIPES_DIR

    assert load_continual_recipe(RECIPES_DIR / "continual.yaml").optimizer.lr == 5e-3


def test_the_python_api_refuses_alike(load_tiny, tokenizer):
    tasks = synthetic_suite(["animals"])
    with pytest.raises(ValueError, match=r"train option\(s\) lr moved to the optimizer"):
        run_task_sequence(load_tiny(), tokenizer, tasks, "lora", None, {"lr": 5e-3})
    with pytest.raises(RecipeError, match="I-LoRA's loss draws a replay batch"):
        run_task_sequence(load_tiny(), tokenizer, tasks, "ilora", None, TRAIN, optimizer={"name": "mezo"})
    with pytest.raises(ValueError, match="optimizer.rank: Input should be greater than or equal to 1"):
        run_task_sequence(load_tiny(), tokenizer, tasks, "lora", None, TRAIN,
                          optimizer={"name": "galore_adamw", "rank": 0})
