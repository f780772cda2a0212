import json

import pytest
import torch

from memft.loram import PruningPlan, apply_plan, select_plan
from memft.loram.plan import PLAN_JSON, ModelDims

from tests.loram.loram_models import tiny_config, tiny_model


def test_plan_round_trips_through_disk_and_rebuilds_the_same_pruned_model(tmp_path, token_batch):
    model = tiny_model(seed=2)
    plan = select_plan(model, 0.5, "magnitude", keep_dense_layers=(1, 1))
    plan.save(tmp_path)
    loaded = PruningPlan.load(tmp_path)
    assert loaded.dims == plan.dims and loaded.pruned_layers == plan.pruned_layers == [1, 2]
    assert (loaded.ratio, loaded.method, loaded.seed) == (0.5, "magnitude", 0)
    for i in plan.pruned_layers:
        assert torch.equal(loaded.mlp_kept[i], plan.mlp_kept[i])
        assert torch.equal(loaded.kv_heads_kept[i], plan.kv_heads_kept[i])
    a = apply_plan(tiny_model(seed=2), plan)
    b = apply_plan(tiny_model(seed=2), loaded)
    with torch.no_grad():
        torch.testing.assert_close(a(token_batch).logits, b(token_batch).logits, rtol=0, atol=0)


def test_query_channels_follow_the_hf_gqa_layout():
    dims = ModelDims.from_config(tiny_config())  # 8 query heads over 4 KV heads: query head q uses KV head q // 2
    plan = PruningPlan(dims, {1: torch.arange(96)}, {1: torch.tensor([1, 3])})
    assert plan.query_heads(1).tolist() == [2, 3, 6, 7]
    assert plan.query_channels(1).tolist() == list(range(32, 64)) + list(range(96, 128))
    assert plan.kv_channels(1).tolist() == list(range(16, 32)) + list(range(48, 64))


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"num_hidden_layers": 3}, "num_hidden_layers"),
        ({"intermediate_size": 80}, "intermediate_size"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"hidden_size": 96}, "hidden_size"),
    ],
)
def test_mismatched_plan_and_model_raise_a_clear_error(overrides, field):
    plan = select_plan(tiny_model(), 0.5, "random", keep_dense_layers=(1, 1))
    other = tiny_model(**overrides)
    with pytest.raises(ValueError, match=f"does not match the model: .*{field}: plan has"):
        apply_plan(other, plan)


def test_corrupt_or_missing_plan_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="No LoRAM pruning plan"):
        PruningPlan.load(tmp_path)
    plan = select_plan(tiny_model(), 0.5, "random", keep_dense_layers=(1, 1))
    plan.save(tmp_path)
    meta = json.loads((tmp_path / PLAN_JSON).read_text())
    meta["pruned_layers"].append(3)
    (tmp_path / PLAN_JSON).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="lacks tensor"):
        PruningPlan.load(tmp_path)


def test_invalid_plans_are_refused():
    dims = ModelDims.from_config(tiny_config())
    with pytest.raises(ValueError, match="strictly increasing"):
        PruningPlan(dims, {1: torch.tensor([3, 2])}, {1: torch.tensor([0])})
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        PruningPlan(dims, {1: torch.tensor([0])}, {1: torch.tensor([4])})
    with pytest.raises(ValueError, match="same pruned layers"):
        PruningPlan(dims, {1: torch.tensor([0])}, {2: torch.tensor([0])})
    with pytest.raises(ValueError, match="model_type"):
        ModelDims.from_config(type("Cfg", (), {"model_type": "gpt2"})())
