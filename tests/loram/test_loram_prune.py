import copy
import inspect

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch._subclasses.fake_tensor import FakeTensorMode

from memft.loram import apply_plan, kept_count, plan_from_counts, prune, resolve_dense_layers, select_plan
from memft.loram.plan import ModelDims

from tests.loram.loram_models import ALL_PROJECTIONS, tiny_config, tiny_model, zero_pruned_units


@pytest.mark.parametrize(
    "model_type,attn",
    [("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"), ("qwen2", "sdpa"), ("qwen3", "sdpa")],
)
def test_pruned_model_equals_full_model_with_pruned_units_zeroed(model_type, attn, token_batch):
    full = tiny_model(model_type, attn_implementation=attn)
    pruned, plan = prune(copy.deepcopy(full), 0.5, "random", keep_dense_layers=(1, 1), seed=3)
    zero_pruned_units(full, plan)
    with torch.no_grad():
        expected = full(token_batch).logits
        got = pruned(token_batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert pruned.model.layers[1].mlp.gate_proj.weight.shape == (48, 128)


@pytest.mark.parametrize("method", ["random", "magnitude", "taylor"])
def test_each_method_keeps_the_requested_counts(method, token_batch):
    model = tiny_model()
    calibration = [token_batch[:1], {"input_ids": token_batch[1:]}] if method == "taylor" else None
    model, plan = prune(model, 0.75, method, keep_dense_layers=[0], calibration=calibration)
    assert plan.pruned_layers == [1, 2, 3] and plan.method == method
    for i in plan.pruned_layers:
        layer = model.model.layers[i]
        assert plan.mlp_kept[i].numel() == 24  # floor(0.25 * 96)
        assert plan.kv_heads_kept[i].numel() == 1  # 4 - floor(0.75 * 4)
        assert layer.mlp.gate_proj.weight.shape == (24, 128) and layer.mlp.down_proj.weight.shape == (128, 24)
        assert layer.self_attn.q_proj.weight.shape == (2 * 16, 128)  # one KV head with its 2 query heads
        assert layer.self_attn.k_proj.weight.shape == (16, 128) and layer.self_attn.o_proj.weight.shape == (128, 32)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (96, 128)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def _unit_scores_by_loops(layer, cfg, weight_fn):
    """Per-unit sums of weight_fn(W) written unit by unit, independent of memft's vectorised scoring."""
    group, hd = cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    e = {n: weight_fn(getattr(layer.mlp, n).weight) for n in ("gate_proj", "up_proj", "down_proj")}
    e.update({n: weight_fn(getattr(layer.self_attn, n).weight) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
    neurons = torch.stack(
        [
            e["gate_proj"][j].sum() + e["up_proj"][j].sum() + e["down_proj"][:, j].sum()
            for j in range(cfg.intermediate_size)
        ]
    )
    heads = []
    for h in range(cfg.num_key_value_heads):
        q_rows = slice(h * group * hd, (h + 1) * group * hd)
        kv_rows = slice(h * hd, (h + 1) * hd)
        heads.append(
            e["q_proj"][q_rows].sum() + e["o_proj"][:, q_rows].sum() + e["k_proj"][kv_rows].sum()
            + e["v_proj"][kv_rows].sum()
        )
    return neurons, torch.stack(heads)


def _top(scores, k):
    return sorted(torch.topk(scores, k).indices.tolist())


def test_magnitude_keeps_units_with_largest_l2_norm():
    model = tiny_model(seed=5)
    cfg = model.config
    plan = select_plan(model, 0.5, "magnitude", keep_dense_layers=(0, 0))
    for i in plan.pruned_layers:
        with torch.no_grad():
            neurons, heads = _unit_scores_by_loops(model.model.layers[i], cfg, torch.square)
        assert plan.mlp_kept[i].tolist() == _top(neurons, 48)
        assert plan.kv_heads_kept[i].tolist() == _top(heads, 2)


def test_taylor_keeps_units_with_largest_first_order_saliency(token_batch):
    model = tiny_model(seed=6)
    cfg = model.config
    batches = [token_batch[:1], token_batch[1:]]
    reference = copy.deepcopy(model)
    for batch in batches:
        reference(input_ids=batch, labels=batch).loss.backward()
    plan = select_plan(model, 0.5, "taylor", keep_dense_layers=(1, 0), calibration=batches)
    for i in plan.pruned_layers:
        layer = reference.model.layers[i]
        grads = {id(p): p.grad for p in layer.parameters()}
        with torch.no_grad():
            neurons, heads = _unit_scores_by_loops(layer, cfg, lambda w: (w * grads[id(w)]).abs())
        assert plan.mlp_kept[i].tolist() == _top(neurons, 48)
        assert plan.kv_heads_kept[i].tolist() == _top(heads, 2)


def test_random_plans_depend_on_seed_only():
    model = tiny_model()
    a, b, c = (select_plan(model, 0.5, "random", (1, 1), seed=s) for s in (7, 7, 8))
    assert all(torch.equal(a.mlp_kept[i], b.mlp_kept[i]) for i in a.pruned_layers)
    assert any(not torch.equal(a.mlp_kept[i], c.mlp_kept[i]) for i in a.pruned_layers)


def test_incremental_decoding_with_cache_matches_full_forward(token_batch):
    """Per-layer KV-head counts differ; the dynamic cache must still hold each layer's own shapes."""
    model, _ = prune(tiny_model(), 0.5, "magnitude", keep_dense_layers=(1, 1))
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        full = model(token_batch).logits
        prefix = model(token_batch[:, :7], use_cache=True)
        rest = model(token_batch[:, 7:], use_cache=True, **{cache_arg: prefix.past_key_values})
    torch.testing.assert_close(rest.logits, full[:, 7:], rtol=1e-5, atol=1e-5)


def test_kept_count_reproduces_llm_pruner_rounding():
    # LLaMA-2-70B: 28672 neurons, 8 KV heads of head_dim 128.
    assert [kept_count(28672, r) for r in (0.65, 0.75, 0.85, 0.95)] == [10035, 7168, 4300, 1433]
    assert [kept_count(8, r, 128) for r in (0.65, 0.75, 0.85, 0.95)] == [3, 2, 2, 1]
    assert kept_count(4, 0.99) == 1
    with pytest.raises(ValueError, match="ratio"):
        kept_count(8, 1.0)


def test_keep_dense_layers_forms():
    assert resolve_dense_layers((2, 1), 6) == [0, 1, 5]
    assert resolve_dense_layers([4, 0], 6) == [0, 4]
    assert resolve_dense_layers(range(2), 6) == [0, 1]
    with pytest.raises(ValueError, match="keep_dense_layers"):
        resolve_dense_layers([9], 6)
    with pytest.raises(TypeError, match="keep_dense_layers"):
        resolve_dense_layers(3, 6)


def test_bad_method_and_missing_calibration_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="prune method"):
        select_plan(model, 0.5, "l1")
    with pytest.raises(ValueError, match="calibration"):
        select_plan(model, 0.5, "taylor")


def test_apply_plan_refuses_a_wrapped_or_already_pruned_model():
    model = tiny_model()
    plan = select_plan(model, 0.5, "random", (1, 1))
    apply_plan(model, plan)
    with pytest.raises(ValueError, match="already pruned"):
        apply_plan(model, plan)
    wrapped = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=ALL_PROJECTIONS))
    with pytest.raises(ValueError, match="before quantizing it or adding LoRA"):
        apply_plan(wrapped, plan)


def test_pruning_and_a_training_step_run_under_fake_tensor_mode():
    """A memory estimator builds the model on fake tensors: pruning and a training step must not read data.

    (peft.get_peft_model itself cannot run inside FakeTensorMode with the installed peft/torch: module.to() fails
    to swap fake parameters, pruned or not; so the step here trains the pruned projections directly.)
    """
    config = tiny_config()
    plan = plan_from_counts(ModelDims.from_config(config), 0.5, (1, 1))
    from transformers import AutoModelForCausalLM

    with FakeTensorMode():
        model = AutoModelForCausalLM.from_config(config)
        apply_plan(model, plan)
        ids = torch.randint(0, 64, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        layer = model.model.layers[1]
        assert layer.mlp.down_proj.weight.grad.shape == (128, 48)
        assert layer.self_attn.q_proj.weight.grad.shape == (64, 128)
        assert layer.self_attn.k_proj.weight.shape == (32, 128)
