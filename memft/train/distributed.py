"""Several processes: the engine that wraps the model, and the collectives the training loop needs.

memft runs on existing engines and adds nothing of its own to their algorithms:

    none       one process
    ddp        torch DistributedDataParallel through accelerate: every process holds everything,
               gradients are all-reduced (averaged) in backward.
    fsdp       torch FSDP2: `fully_shard` on every decoder layer and on the root module. Parameters,
               gradients and optimizer state are DTensors sharded by rows (dim 0) across processes;
               layers are all-gathered for forward/backward, gradients reduce-scattered (averaged).
    deepspeed  DeepSpeed ZeRO stage 1 (optimizer state sharded) or 2 (gradients too), optionally with
               the optimizer offloaded to the CPU, through accelerate's plugin. DeepSpeed's engine owns
               clipping, the step and the zeroing of gradients.

Every engine averages gradients over processes, so each process multiplies its loss (already divided
by the tokens of the whole global step) by the process count: the gradient then equals the
single-process gradient of the global batch.

Checkpoints per engine (see memft.train.checkpoint): ddp/none and deepspeed write the full
trainable weights from the main process; the optimizer state is written by the main process (ddp), by
every process for its ZeRO partition (deepspeed, `optimizer-rank{r}.pt`), or as one
torch.distributed.checkpoint directory of sharded model and optimizer state (fsdp, `sharded/`), which
can be resumed on a different number of processes.
"""

from __future__ import annotations

import enum
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from memft.errors import RecipeError, RunError
from memft.train.recipe import Recipe


# ------------------------------------------------------------------------------------------ processes
@dataclass(frozen=True)
class Processes:
    """This process's rank and the process count, read from torch.distributed (accelerate's own state
    reports one process under DeepSpeed on CPU, so the loop never relies on it)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        """Sum a Python number over processes (float64 on the CPU or the process's CUDA device)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor(value, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def current_processes() -> Processes:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size())
    return Processes()


# -------------------------------------------------------------------------------------------- engines
class Engine:
    """Single process and DDP: accelerate prepares the model (and, for backprop, the optimizer)."""

    name = "none"
    # Autocast and fp16 loss scaling are done by the step (memft.train.step), not by accelerate, so that
    # the planner runs the same step; engines that cast parameters themselves (FSDP, DeepSpeed) say False.
    step_owns_precision = True

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def accelerator(self, on_cpu: bool):
        from accelerate import Accelerator

        # mixed_precision "no": the step autocasts (an accelerate launch flag reaches it through the recipe,
        # memft.train.launcher), so accelerate must not wrap the forward in a second autocast of its own.
        self._accelerator = Accelerator(cpu=on_cpu, mixed_precision="no")
        return self._accelerator

    def prepare(self, accelerator, model: torch.nn.Module, build_plan):
        """Wrap the model and build the optimizer plan (`build_plan(model)`) for its parameters."""
        plan = build_plan(model)
        if plan.step_kind == "backprop":
            model, optimizer = accelerator.prepare(model, plan.optimizer)
            plan.optimizer = optimizer
        else:
            model = accelerator.prepare(model)
        return model, plan

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The HF (or PEFT) model inside the engine's wrapper."""
        return self._accelerator.unwrap_model(model)

    def micro_batch(self, accelerator, model, last: bool, processes: Processes):
        """Context for one micro-batch's forward and backward; gradients are synchronised on the last."""
        if last or processes.world == 1:
            return nullcontext()
        return accelerator.no_sync(model)

    def backward(self, accelerator, model, loss: torch.Tensor, processes: Processes) -> None:
        accelerator.backward(loss * processes.world)

    def step(self, accelerator, model, optimizer, max_grad_norm: float | None, scaler=None) -> None:
        """Clip, step and zero the gradients; with an fp16 `scaler`, unscale first and let it skip the step
        on overflow (the step updates the scaler)."""
        if scaler is not None:
            scaler.unscale_(optimizer)
        if max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # checkpoints ------------------------------------------------------------------------------
    def save_state(self, directory: Path, model, optimizer, processes: Processes) -> None:
        """Write weights and optimizer state into `directory` (called on every process)."""
        from memft.train.checkpoint import save_trainable

        if processes.is_main:
            save_trainable(self.unwrap(model), directory)
            torch.save(optimizer.state_dict(), directory / "optimizer.pt")

    def load_state(self, directory: Path, model, optimizer, processes: Processes) -> None:
        from memft.train.checkpoint import load_tensors, load_trainable

        load_trainable(self.unwrap(model), directory)
        state = load_tensors(directory / "optimizer.pt")
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise RunError(f"--resume: the optimizer state in '{directory}' does not fit this recipe's optimizer "
                           f"({exc}). Resume with the recipe that wrote it.") from exc

    def full_state_dict(self, model) -> dict[str, torch.Tensor] | None:
        """The whole model's weights for `final/` on the main process (None: use the model's own)."""
        return None


class DDPEngine(Engine):
    name = "ddp"


class FSDPEngine(Engine):
    """torch FSDP2 applied by memft (accelerate maps FSDP to plain DDP on CPU-only machines, so the
    sharding is done here, the same way on CPU and GPU)."""

    name = "fsdp"
    step_owns_precision = False  # MixedPrecisionPolicy casts the parameters

    def accelerator(self, on_cpu: bool):
        from accelerate import Accelerator

        # process group and device; precision is FSDP's policy
        self._accelerator = Accelerator(cpu=on_cpu, mixed_precision="no")
        return self._accelerator

    def prepare(self, accelerator, model, build_plan):
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        options, precision = self.recipe.distributed.fsdp, self.recipe.train.mixed_precision
        kwargs: dict = {"reshard_after_forward": options.reshard_after_forward}
        if precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if options.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        else:
            model.to(accelerator.device)
        layers = decoder_layers(model)
        if not layers:
            raise RecipeError("distributed.engine fsdp shards the model's decoder layers, but this model names "
                              "none (`_no_split_modules` is empty); use distributed.engine ddp.")
        for layer in layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model, build_plan(model)  # the optimizer must see the sharded (DTensor) parameters

    def unwrap(self, model):
        return model

    def micro_batch(self, accelerator, model, last, processes):
        model.set_requires_gradient_sync(last)
        return nullcontext()

    def backward(self, accelerator, model, loss, processes):
        (loss * processes.world).backward()

    def step(self, accelerator, model, optimizer, max_grad_norm, scaler=None):
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def save_state(self, directory, model, optimizer, processes):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer,
                                                      options=StateDictOptions(ignore_frozen_params=True))
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory / "sharded")

    def load_state(self, directory, model, optimizer, processes):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        if not (directory / "sharded").is_dir():
            raise RunError(f"--resume: checkpoint '{directory}' was not written by engine fsdp (no sharded/ "
                           "directory); resume it with the engine that wrote it.")
        options = StateDictOptions(ignore_frozen_params=True)
        model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=directory / "sharded")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=options)

    def full_state_dict(self, model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # Tied weights (e.g. lm_head = embed_tokens) come back as separate copies: keep the first name only,
        # as save_pretrained does for a model in memory.
        names: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        return {k: v for k, v in state.items() if k not in {n for group in names.values() for n in group[1:]}}


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO through accelerate's DeepSpeedPlugin; the loop drives the DeepSpeed engine itself
    (backward with the accumulation boundary, then `engine.step()`, which clips, steps and zeroes)."""

    name = "deepspeed"
    step_owns_precision = False  # the DeepSpeed config's bf16 section casts the parameters

    def config(self) -> dict:
        r, options = self.recipe, self.recipe.distributed.deepspeed
        zero: dict = {"stage": options.stage}
        if options.offload_optimizer == "cpu":
            zero["offload_optimizer"] = {"device": "cpu"}
        bf16 = r.train.mixed_precision == "bf16" or r.model.dtype == "bfloat16"
        return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": r.train.batch_size,
                "gradient_accumulation_steps": r.train.grad_accum,
                "gradient_clipping": r.train.max_grad_norm or 0.0, "bf16": {"enabled": bf16},
                "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}

    def accelerator(self, on_cpu: bool):
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            raise RecipeError("distributed.engine deepspeed needs DeepSpeed: pip install 'memft[deepspeed]'.") from exc
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin

        # DeepSpeed picks its CPU accelerator by itself on machines without GPUs.
        # precision is the config's bf16 section (an accelerate launch flag reaches it through the recipe)
        self._accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=self.config()),
                                        mixed_precision="no")
        return self._accelerator

    def prepare(self, accelerator, model, build_plan):
        # DeepSpeed's default communication buckets hold 5e8 elements (2 GB in fp32) whatever the model;
        # size them like accelerate's "auto" (hidden_size squared), at least 2^20 elements.
        hidden = getattr(getattr(model, "config", None), "hidden_size", None) or 1024
        zero = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = max(hidden * hidden, 2**20)
        plan = build_plan(model)
        model, optimizer = accelerator.prepare(model, plan.optimizer)
        plan.optimizer = optimizer
        return model, plan

    def unwrap(self, model):
        return model.module

    def micro_batch(self, accelerator, model, last, processes):
        model.set_gradient_accumulation_boundary(last)
        return nullcontext()

    def backward(self, accelerator, model, loss, processes):
        model.backward(loss * processes.world, scale_wrt_gas=False)

    def step(self, accelerator, model, optimizer, max_grad_norm, scaler=None):
        model.step()  # clipping comes from the DeepSpeed config

    def save_state(self, directory, model, optimizer, processes):
        from memft.train.checkpoint import save_trainable

        if processes.is_main:
            save_trainable(self.unwrap(model), directory)
        torch.save(_plain(model.optimizer.state_dict()), directory / f"optimizer-rank{processes.rank}.pt")

    def load_state(self, directory, model, optimizer, processes):
        from memft.train.checkpoint import load_tensors, load_trainable

        path = directory / f"optimizer-rank{processes.rank}.pt"
        if not path.is_file():
            raise RunError(f"--resume: checkpoint '{directory}' has no ZeRO partition for process "
                           f"{processes.rank} ({path.name}); resume with the engine and process count that "
                           "wrote it.")
        load_trainable(self.unwrap(model), directory)
        state = load_tensors(path)
        # ZeRO reads entry `dp_rank` of a list holding every process's partition.
        model.optimizer.load_state_dict([state] * processes.world, load_from_fp32_weights=True)


def _plain(value):
    """A ZeRO optimizer state dict reduced to what `torch.load(weights_only=True)` reads back: enums become
    their values, and the objects DeepSpeed keeps for itself are dropped (the loss scaler, unused without
    fp16; the slice mappings, used only by its universal-checkpoint converter)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if _is_plain(v)}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _is_plain(value) -> bool:
    return isinstance(value, (dict, list, tuple, torch.Tensor, enum.Enum, int, float, str, bool, type(None)))


ENGINES: dict[str, type[Engine]] = {"none": Engine, "ddp": DDPEngine, "fsdp": FSDPEngine,
                                    "deepspeed": DeepSpeedEngine}


def engine_for(recipe: Recipe) -> Engine:
    return ENGINES[recipe.distributed.engine](recipe)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one: instances of the classes the model lists in
    `_no_split_modules` (its transformer blocks), found through PEFT wrappers too."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]
