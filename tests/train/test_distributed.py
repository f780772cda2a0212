"""Engine pieces that need no second process: the DeepSpeed configuration memft derives from a recipe,
ZeRO optimizer state made loadable with weights_only, FSDP's choice of modules to shard."""

import enum

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memft.train.distributed import DeepSpeedEngine, Processes, _plain, decoder_layers, engine_for
from memft.train.recipe import load_recipe


def test_deepspeed_config_follows_the_recipe():
    recipe = load_recipe(None, ["distributed.engine=deepspeed", "distributed.deepspeed.stage=1",
                                "distributed.deepspeed.offload_optimizer=cpu", "train.batch_size=3",
                                "train.grad_accum=2", "train.max_grad_norm=0.5", "train.mixed_precision=bf16"])
    config = engine_for(recipe).config()
    assert config["zero_optimization"] == {"stage": 1, "offload_optimizer": {"device": "cpu"}}
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 0.5 and config["bf16"] == {"enabled": True}
    plain = DeepSpeedEngine(load_recipe(None, ["distributed.engine=deepspeed", "train.max_grad_norm=null"])).config()
    assert plain["gradient_clipping"] == 0.0 and plain["bf16"] == {"enabled": False}


def test_zero_state_is_reduced_to_what_weights_only_loads(tmp_path):
    class Stage(enum.IntEnum):
        gradients = 2

    class Scaler:
        pass

    state = {"loss_scaler": Scaler(), "param_slice_mappings": [{"w": Scaler()}], "zero_stage": Stage.gradients,
             "base_optimizer_state": [{"exp_avg": torch.ones(3)}], "single_partition_of_fp32_groups": [torch.zeros(4)],
             "ds_version": "0.19.8", "clip_grad": 1.0}
    torch.save(_plain(state), tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert "loss_scaler" not in loaded and loaded["zero_stage"] == 2 and loaded["param_slice_mappings"] == [{}]
    assert torch.equal(loaded["base_optimizer_state"][0]["exp_avg"], torch.ones(3))


def test_fsdp_shards_every_decoder_layer_also_inside_peft():
    from peft import LoraConfig, get_peft_model

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    assert [type(m).__name__ for m in decoder_layers(model)] == ["LlamaDecoderLayer"] * 3
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert len(decoder_layers(wrapped)) == 3


def test_one_process_needs_no_collectives():
    processes = Processes()
    assert processes.is_main and processes.sum(2.5) == 2.5
    processes.barrier()
