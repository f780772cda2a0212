"""Training-memory estimation on fake tensors: the real training step, no real allocation.

``estimate_training_memory`` builds the model, optimizer and batches under
``torch._subclasses.fake_tensor.FakeTensorMode`` and runs ``steps`` training steps (forward, loss, backward,
optimizer step, zero_grad; or any ``train_step`` such as a zeroth-order step) inside a ``MemoryTracker``.
Fake tensors carry shapes, dtypes and storage sizes but no data, so a 7B-parameter step runs on a laptop
CPU in seconds, and the tracker counts exactly the storage a real run would hold.

``estimate_from_config`` does this for Hugging Face configs (causal LMs, T5-style seq2seq, BERT/RoBERTa
encoders for sequence classification); configs shipped in ``memft/configs`` are listed by ``list_configs``.

A CUDA target runs fake CUDA tensors where CUDA is available; on a CPU-only machine it runs CPU kernels and
applies the CUDA allocator's 512-byte rounding (there, AdamW's host-side ``step`` counters are counted as one
512-byte block each: 149 KB for Llama-2-7B). Torch optimizers default to ``foreach=True`` for real CUDA
tensors but not for fake ones, so the estimator sets it for a CUDA target. Fake tensors never count the CUDA
context, cuBLAS workspaces or allocator fragmentation (see ``memft.memory.gpus`` for the margin assumed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from memft.memory.report import MemoryReport
from memft.memory.tracker import MemoryTracker

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ENCODER_ONLY_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "albert")
TASKS = ("causal-lm", "seq2seq-lm", "sequence-classification")
OPTIMIZERS = ("adamw", "adam", "sgd", "none")

BuildModel = Callable[[], nn.Module]
MakeBatch = Callable[[], Any]
BuildOptimizer = Callable[[nn.Module], torch.optim.Optimizer]
LossFn = Callable[[nn.Module, Any], torch.Tensor]
TrainStep = Callable[[nn.Module, Any, "torch.optim.Optimizer | None"], Any]


# ---------------------------------------------------------------------------- configs
def list_configs() -> list[str]:
    """Names of the model configs shipped in ``memft/configs`` (architecture only, no weights)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A config dict from a shipped name ("llama-2-7b"), a JSON file path, or a dict (copied)."""
    if isinstance(name_or_path, Mapping):
        return dict(name_or_path)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"config must be a name, a path or a dict, got {type(name_or_path).__name__}.")
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return json.loads(path.read_text())
    shipped = CONFIG_DIR / f"{name_or_path}.json"
    if shipped.is_file():
        return json.loads(shipped.read_text())
    raise ValueError(
        f"unknown config {str(name_or_path)!r}: not a JSON file and not a shipped config. "
        f"Known configs: {', '.join(list_configs())}; or pass a path to a config.json or a dict."
    )


# ---------------------------------------------------------------------------- training step
def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss`` for a dict batch; ``model(*batch)`` / ``model(batch)`` returning a scalar."""
    out = model(**batch) if isinstance(batch, Mapping) else model(*batch) if isinstance(batch, tuple) else model(batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", out)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(
            "default_loss could not find a scalar loss: the model output has no `.loss` and is not a scalar "
            "tensor. Pass loss_fn=lambda model, batch: ... returning the scalar loss."
        )
    return loss


def default_train_step(
    model: nn.Module,
    batch: Any,
    optimizer: torch.optim.Optimizer | None,
    loss_fn: LossFn = default_loss,
) -> None:
    """Forward + loss, backward, ``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``.

    The model output is dropped before backward (as in HF Trainer), so logits not saved for backward die
    early; only the loss is kept.
    """
    loss = loss_fn(model, batch)
    loss.backward()
    del loss
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _mirror_cuda_optimizer_defaults(optimizer: torch.optim.Optimizer) -> bool:
    """Set ``foreach=True`` where a torch optimizer would pick it for real CUDA tensors (not fake ones)."""
    if not type(optimizer).__module__.startswith("torch.optim"):
        return False
    changed = False
    for group in optimizer.param_groups:
        if "foreach" in group and group["foreach"] is None and not group.get("fused") and not group.get("differentiable"):
            group["foreach"] = True
            changed = True
    return changed


def _check_callable(name: str, value: Any, signature: str) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable {signature}, got {type(value).__name__}.")


def _resolve_step(
    build_model: BuildModel,
    make_batch: MakeBatch,
    build_optimizer: BuildOptimizer | None,
    loss_fn: LossFn | None,
    train_step: TrainStep | None,
    steps: int,
) -> TrainStep:
    if build_model is None or make_batch is None:
        raise TypeError("build_model and make_batch are required callables.")
    _check_callable("build_model", build_model, "() -> nn.Module")
    _check_callable("make_batch", make_batch, "() -> batch")
    _check_callable("build_optimizer", build_optimizer, "(model) -> torch.optim.Optimizer")
    _check_callable("loss_fn", loss_fn, "(model, batch) -> scalar loss tensor")
    _check_callable("train_step", train_step, "(model, batch, optimizer) -> Any")
    if train_step is not None and loss_fn is not None:
        raise ValueError(
            "loss_fn is only used by the default training step; with train_step=... compute the loss inside "
            "train_step and drop loss_fn."
        )
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}; use 2 so optimizer state exists.")
    if train_step is not None:
        return train_step
    loss = loss_fn or default_loss
    return lambda model, batch, optimizer: default_train_step(model, batch, optimizer, loss)


def _run_steps(
    build_model: BuildModel,
    make_batch: MakeBatch,
    build_optimizer: BuildOptimizer | None,
    step: TrainStep,
    steps: int,
    device: torch.device,
    granularity: int | None,
    track_modules: bool,
    foreach_for_cuda: bool,
) -> tuple[MemoryTracker, dict[str, int], list[str]]:
    """Build model, optimizer and batches with ``device`` as default device (in whatever tensor mode is
    active) and track ``steps`` steps. The step itself runs without a default device, as in real training
    (torch optimizers keep their ``step`` counters on the host)."""
    notes: list[str] = []
    with torch.device(device):
        model = build_model()
    if not isinstance(model, nn.Module):
        raise TypeError(f"build_model must return an nn.Module, got {type(model).__name__}.")
    model.train()
    with torch.device(device):
        optimizer = build_optimizer(model) if build_optimizer is not None else None
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"build_optimizer must return a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    if optimizer is not None and foreach_for_cuda and _mirror_cuda_optimizer_defaults(optimizer):
        notes.append("torch optimizer set to foreach=True, PyTorch's default for real CUDA tensors")
    counts = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    tracker = MemoryTracker(model, optimizer, device=device, track_modules=track_modules, granularity=granularity)
    with tracker:
        for i in range(steps):
            if i:
                tracker.reset_peak()
            with tracker.tagging("other"), torch.device(device):
                batch = make_batch()
            step(model, batch, optimizer)
            del batch
    return tracker, counts, notes


def estimate_training_memory(
    build_model: BuildModel,
    make_batch: MakeBatch,
    build_optimizer: BuildOptimizer | None = None,
    *,
    loss_fn: LossFn | None = None,
    train_step: TrainStep | None = None,
    steps: int = 2,
    device: str | torch.device = "cuda",
    run_device: str | torch.device | None = None,
    mirror_cuda_defaults: bool = True,
    track_modules: bool = False,
    name: str = "estimate",
    meta: Mapping[str, Any] | None = None,
) -> MemoryReport:
    """Peak training memory of ``steps`` steps, measured on fake tensors (nothing real is allocated).

    Args:
        build_model: ``() -> nn.Module``, called under ``FakeTensorMode`` with ``run_device`` as default
            device (do not move the model to another device inside it). The model is put in train mode.
        make_batch: ``() -> batch``, called inside the tracked region before every step; the batch is
            counted under ``other``. Dict batches are passed as ``model(**batch)``.
        build_optimizer: ``(model) -> Optimizer`` or None for no optimizer.
        loss_fn: ``(model, batch) -> scalar loss`` for the default step (default ``default_loss``).
        train_step: ``(model, batch, optimizer) -> Any`` replacing the default step (a zeroth-order step, a
            layer-wise optimizer, gradient accumulation). Exclusive with ``loss_fn``.
        steps: training steps; 2 so that lazily created optimizer state exists in the second step.
        device: the device whose memory is estimated ("cuda" or "cpu"); "cuda" rounds every storage to the
            CUDA allocator's 512-byte blocks.
        run_device: device the fake tensors claim to live on; default ``device`` where its backend is
            available, else "cpu" (CPU kernels' saved-tensor choices can differ slightly, e.g. attention).
        mirror_cuda_defaults: for a CUDA target, set ``foreach=True`` on torch optimizers left at the default,
            as PyTorch does for real CUDA tensors (their foreach step holds one extra full-size temporary).
        track_modules: attribute activation bytes to submodule names (``report.module_activations``).
        name, meta: stored on the report.

    Returns:
        ``MemoryReport`` with ``source="estimated"``: peak over all steps, its breakdown, one peak per step.
    """
    step = _resolve_step(build_model, make_batch, build_optimizer, loss_fn, train_step, steps)
    target = torch.device(device)
    if run_device is None:
        available = target.type == "cpu" or (target.type == "cuda" and torch.cuda.is_available())
        run_device = target if available else torch.device("cpu")
    run = torch.device(run_device)
    granularity = 512 if target.type == "cuda" else 1
    with FakeTensorMode(allow_non_fake_inputs=True):
        tracker, counts, notes = _run_steps(
            build_model,
            make_batch,
            build_optimizer,
            step,
            steps,
            run,
            granularity,
            track_modules,
            foreach_for_cuda=mirror_cuda_defaults and target.type == "cuda",
        )
    report = tracker.summary(name=name, source="estimated", target_device=str(target))
    if run.type != target.type:
        notes.append(f"simulated with {run.type} kernels for a {target.type} target")
    notes.append("fake tensors: CUDA context, cuBLAS/attention workspaces and fragmentation not included")
    report.notes += notes
    report.meta.update({**counts, "steps": steps, "run_device": str(run), **(meta or {})})
    return report


def measure_training_memory(
    build_model: BuildModel,
    make_batch: MakeBatch,
    build_optimizer: BuildOptimizer | None = None,
    *,
    loss_fn: LossFn | None = None,
    train_step: TrainStep | None = None,
    steps: int = 2,
    device: str | torch.device = "cpu",
    track_modules: bool = False,
    name: str = "measured",
    meta: Mapping[str, Any] | None = None,
) -> MemoryReport:
    """The real counterpart of ``estimate_training_memory``: same arguments, real tensors on ``device``.

    Returns a ``MemoryReport`` with ``source="tracked"``; on CUDA ``report.cuda`` also holds the
    allocator's ``max_memory_allocated``/``max_memory_reserved`` for the last step and the run.
    """
    step = _resolve_step(build_model, make_batch, build_optimizer, loss_fn, train_step, steps)
    dev = torch.device(device)
    tracker, counts, notes = _run_steps(
        build_model, make_batch, build_optimizer, step, steps, dev, None, track_modules, foreach_for_cuda=False
    )
    report = tracker.summary(name=name, source="tracked", target_device=str(dev))
    report.notes += notes
    report.meta.update({**counts, "steps": steps, **(meta or {})})
    return report


# ---------------------------------------------------------------------------- HF configs
def _dtype_kwarg() -> str:
    """``from_config`` takes ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _resolve_dtype(dtype: str | torch.dtype | None, config: Mapping[str, Any]) -> torch.dtype:
    value = dtype if dtype is not None else config.get("torch_dtype") or config.get("dtype") or "float32"
    if isinstance(value, torch.dtype):
        return value
    resolved = getattr(torch, str(value).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name ('bfloat16', 'float32'), got {value!r}.")
    return resolved


@contextmanager
def hf_unpacked_sequences() -> Iterator[None]:
    """Tell HF mask creation that batches are not packed, as it finds out itself on real data.

    ``transformers.masking_utils.find_packed_sequence_indices`` cannot inspect fake position ids and then
    assumes packing, which materialises a (B, 1, L, L) mask and changes the attention kernel; a real run
    of the same unpacked batch skips the mask. Patching it to "no packing" keeps both runs identical.
    """
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def _enable_checkpointing(model: nn.Module) -> None:
    """HF non-reentrant activation checkpointing (``activation_checkpointing_enable`` from transformers 5.x)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"gradient_checkpointing=True but {type(model).__name__} has no checkpointing switch.")


def _task_for(hf_config: Any, task: str | None) -> str:
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)} or None (inferred), got {task!r}.")
        return task
    if getattr(hf_config, "is_encoder_decoder", False):
        return "seq2seq-lm"
    if hf_config.model_type in ENCODER_ONLY_TYPES:
        return "sequence-classification"
    return "causal-lm"


def _build_optimizer(name: str | BuildOptimizer | None, kwargs: Mapping[str, Any]) -> BuildOptimizer | None:
    if name is None or callable(name):
        return name
    key = str(name).lower()
    classes = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    if key == "none":
        return None
    if key not in classes:
        raise ValueError(
            f"optimizer must be one of {', '.join(OPTIMIZERS)} or a callable (model) -> Optimizer "
            f"(e.g. lambda m: GaLoreAdamW(...)), got {name!r}."
        )
    cls = classes[key]
    options = {"lr": 1e-5, **kwargs}
    return lambda model: cls([p for p in model.parameters() if p.requires_grad], **options)


@dataclass
class HFTrainingSetup:
    """Builders for one Hugging Face training configuration, shared by estimation and measurement.

    ``build_model`` builds the architecture from its config (random weights), ``make_batch`` draws a random
    batch of the configured shape, ``build_optimizer`` is the optimizer factory (or None). ``packed``: the
    batches hold several sequences per row (position ids restarting, no attention mask), so HF builds the
    block mask that keeps them apart; otherwise they are unpacked (:func:`hf_unpacked_sequences`).
    """

    name: str
    build_model: BuildModel
    make_batch: MakeBatch
    build_optimizer: BuildOptimizer | None
    meta: dict[str, Any] = field(default_factory=dict)
    packed: bool = False

    def _sequences(self):
        return nullcontext() if self.packed else hf_unpacked_sequences()

    def estimate(
        self,
        *,
        train_step: TrainStep | None = None,
        steps: int = 2,
        device: str | torch.device = "cuda",
        run_device: str | torch.device | None = None,
        track_modules: bool = False,
    ) -> MemoryReport:
        """``estimate_training_memory`` of this setup (fake tensors)."""
        with self._sequences():
            return estimate_training_memory(
                self.build_model,
                self.make_batch,
                self.build_optimizer,
                train_step=train_step,
                steps=steps,
                device=device,
                run_device=run_device,
                track_modules=track_modules,
                name=self.name,
                meta=self.meta,
            )

    def measure(
        self,
        *,
        train_step: TrainStep | None = None,
        steps: int = 2,
        device: str | torch.device = "cpu",
        track_modules: bool = False,
    ) -> MemoryReport:
        """``measure_training_memory`` of this setup (real tensors on ``device``)."""
        with self._sequences():
            return measure_training_memory(
                self.build_model,
                self.make_batch,
                self.build_optimizer,
                train_step=train_step,
                steps=steps,
                device=device,
                track_modules=track_modules,
                name=self.name,
                meta=self.meta,
            )


def _check_model_type(raw: Mapping[str, Any]) -> None:
    """Refuse a model type transformers does not ship in one sentence (its own error lists every known type)."""
    import transformers
    from transformers import CONFIG_MAPPING

    model_type = raw["model_type"]
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return
    custom = " (the config has an auto_map: the model needs its own code)" if "auto_map" in raw else ""
    raise ValueError(
        f"model_type {str(model_type)[:200]!r} is not an architecture transformers {transformers.__version__} "
        f"ships{custom}. Estimates build shipped architectures only: pass a shipped config "
        f"({', '.join(list_configs())}) or the config.json of a known architecture."
    )


def hf_training_setup(
    config: str | os.PathLike | Mapping[str, Any],
    dtype: str | torch.dtype | None = None,
    batch_size: int = 1,
    seq_len: int = 512,
    optimizer: str | BuildOptimizer | None = "adamw",
    gradient_checkpointing: bool = False,
    *,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    task: str | None = None,
    target_len: int | None = None,
    num_labels: int = 2,
    model_transform: Callable[[nn.Module], nn.Module | None] | None = None,
    name: str | None = None,
    attn_implementation: str | None = None,
) -> HFTrainingSetup:
    """Builders for full fine-tuning of a Hugging Face architecture given only its config.

    Args:
        config: shipped name (see ``list_configs()``), path to a config.json, or a dict.
        dtype: parameter dtype ("bfloat16", "float32", ...); default the config's ``torch_dtype``. Torch
            optimizers keep their state in the parameter dtype (bf16 parameters -> bf16 AdamW moments).
        batch_size, seq_len: input shape (tokens = batch_size x seq_len); ``target_len`` is the decoder
            length for seq2seq models (default ``seq_len``). No attention mask: every token is real.
        optimizer: "adamw", "adam", "sgd", "none", or ``(model) -> Optimizer`` (GaLore, 8-bit, ...).
        gradient_checkpointing: HF non-reentrant activation checkpointing of every layer.
        optimizer_kwargs: extra arguments for a named optimizer (``lr``, ``foreach``, ``momentum``, ...).
        task: "causal-lm", "seq2seq-lm" or "sequence-classification" (``num_labels`` classes); inferred
            from the config (encoder-decoder -> seq2seq, BERT-like -> classification, else causal).
        model_transform: ``(model) -> model or None`` applied after building (LoRA, loss patches, freezing).
        attn_implementation: the attention kernel ("eager", "sdpa", ...); default transformers' choice.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    for arg, value in (("batch_size", batch_size), ("seq_len", seq_len), ("num_labels", num_labels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}.")
    _check_callable("model_transform", model_transform, "(model) -> model or None")
    raw = load_config(config)
    if "model_type" not in raw:
        raise ValueError("config has no 'model_type' key: pass a Hugging Face config.json (or a shipped name).")
    _check_model_type(raw)
    torch_dtype = _resolve_dtype(dtype, raw)
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "torch_dtype", "dtype", "transformers_version")}
    hf_config = AutoConfig.for_model(raw["model_type"], **fields)
    resolved_task = _task_for(hf_config, task)
    if resolved_task == "sequence-classification":
        hf_config.num_labels = num_labels
    hf_config.use_cache = False
    auto = {
        "causal-lm": AutoModelForCausalLM,
        "seq2seq-lm": AutoModelForSeq2SeqLM,
        "sequence-classification": AutoModelForSequenceClassification,
    }[resolved_task]
    dtype_kwarg = _dtype_kwarg()
    vocab = int(hf_config.vocab_size)
    tgt_len = target_len or seq_len
    build_optimizer = _build_optimizer(optimizer, optimizer_kwargs or {})

    def build_model() -> nn.Module:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = auto.from_config(hf_config, **{dtype_kwarg: torch_dtype}, **extra)
        if gradient_checkpointing:
            _enable_checkpointing(model)
        if model_transform is not None:
            model = model_transform(model) or model
        return model

    def make_batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, vocab, (batch_size, seq_len))
        if resolved_task == "causal-lm":
            return {"input_ids": ids, "labels": ids}
        if resolved_task == "seq2seq-lm":
            return {"input_ids": ids, "labels": torch.randint(0, vocab, (batch_size, tgt_len))}
        return {"input_ids": ids, "labels": torch.randint(0, num_labels, (batch_size,))}

    label = name or (raw["model_type"] if isinstance(config, Mapping) else Path(str(config)).stem)
    meta: dict[str, Any] = {
        "config": label,
        "model_type": raw["model_type"],
        "task": resolved_task,
        "dtype": str(torch_dtype).replace("torch.", ""),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "optimizer": optimizer if optimizer is None or isinstance(optimizer, str) else getattr(optimizer, "__name__", "custom"),
        "gradient_checkpointing": gradient_checkpointing,
    }
    if resolved_task != "sequence-classification":
        meta.update({"vocab_size": vocab, "tokens": batch_size * (tgt_len if resolved_task == "seq2seq-lm" else seq_len)})
    return HFTrainingSetup(label, build_model, make_batch, build_optimizer, meta)


def estimate_from_config(
    config: str | os.PathLike | Mapping[str, Any],
    dtype: str | torch.dtype | None = None,
    batch_size: int = 1,
    seq_len: int = 512,
    optimizer: str | BuildOptimizer | None = "adamw",
    gradient_checkpointing: bool = False,
    *,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    task: str | None = None,
    target_len: int | None = None,
    num_labels: int = 2,
    model_transform: Callable[[nn.Module], nn.Module | None] | None = None,
    train_step: TrainStep | None = None,
    steps: int = 2,
    device: str | torch.device = "cuda",
    run_device: str | torch.device | None = None,
    track_modules: bool = False,
    name: str | None = None,
) -> MemoryReport:
    """Estimated peak memory of full fine-tuning from a config alone, e.g.
    ``estimate_from_config("llama-2-7b", "bfloat16", batch_size=1, seq_len=256)``.

    Arguments as in ``hf_training_setup`` (model, batch, optimizer) and ``estimate_training_memory``
    (``train_step``, ``steps``, ``device``, ``run_device``, ``track_modules``).
    """
    setup = hf_training_setup(
        config,
        dtype,
        batch_size,
        seq_len,
        optimizer,
        gradient_checkpointing,
        optimizer_kwargs=optimizer_kwargs,
        task=task,
        target_len=target_len,
        num_labels=num_labels,
        model_transform=model_transform,
        name=name,
    )
    return setup.estimate(
        train_step=train_step, steps=steps, device=device, run_device=run_device, track_modules=track_modules
    )
