"""The recipe: a validated description of one fine-tuning run.

A recipe is YAML read with `yaml.safe_load`, overridden by dotted `key=value` pairs from the command
line, and validated by the pydantic models below. Every field has a help text (`memft schema` prints
them with defaults). Unknown keys are errors with a "did you mean"; all problems are reported together,
each with its path in the recipe.

Method sections (`optimizer`, `activations`, `loss`, `adapter`) are tagged unions keyed by `name`: each
method accepts exactly its own options, so a GaLore knob given to plain AdamW is an error, not a no-op.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from memft.errors import RecipeError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------------------------- model
class ModelSection(Section):
    name_or_path: str = Field("memft:tiny-llama", description="Hub id, local directory, or a bundled model "
                              "('memft:tiny-llama', a ~0.9M-parameter Llama that runs offline).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype the weights are "
                                                             "loaded in.")
    attn_implementation: Literal["eager", "sdpa"] = Field("sdpa", description="Attention kernel; 'eager' "
                                                          "materialises the attention matrix (needed by "
                                                          "compressors that store softmax outputs).")
    gradient_checkpointing: bool = Field(False, description="Recompute layer activations in backward "
                                         "(non-reentrant) instead of storing them.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub/directory to run. Off "
                                    "unless you trust the source.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")


# ---------------------------------------------------------------------------------------------- data
class DatasetSource(Section):
    path: str = Field(..., description="Local .jsonl/.json/.csv/.parquet/.txt file, a hub dataset name, or a "
                      "bundled set ('memft:alpaca', 'memft:chat', 'memft:text').")
    format: Literal["text", "alpaca", "chat"] = Field(..., description="'text': plain text in `text_field`; "
                                                     "'alpaca': instruction/input/output; 'chat': `messages` "
                                                     "with roles, rendered by the tokenizer's chat template.")
    split: str = Field("train", description="Split to read (hub datasets; local files have one 'train' split).")
    text_field: str = Field("text", description="Column holding the text for format 'text'.")
    max_examples: int | None = Field(None, ge=1, description="Use at most this many rows (first rows).")


class DataSection(Section):
    train: DatasetSource = Field(default_factory=lambda: DatasetSource(path="memft:alpaca", format="alpaca"),
                                 description="Training data.")
    eval: DatasetSource | None = Field(None, description="Evaluation data; if absent, `eval_fraction` of the "
                                       "training rows is held out.")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of training rows held out for "
                                 "evaluation when `eval` is not given (0 disables evaluation).")
    max_seq_len: int = Field(256, ge=8, description="Sequences are truncated (or packed) to this many tokens; "
                             "must not exceed the model's maximum positions.")
    packing: bool = Field(False, description="Concatenate examples into full-length sequences (no padding).")
    loss_on: Literal["response", "all"] = Field("response", description="For alpaca/chat: train only on "
                                                "response tokens ('response') or on every token ('all').")


# ------------------------------------------------------------------------------------------ optimizer
class _OptimizerCommon(Section):
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")


class _AdamKnobs(_OptimizerCommon):
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam moment coefficients.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")


class AdamWSection(_AdamKnobs):
    name: Literal["adamw"] = Field("adamw", description="torch.optim.AdamW.")


class AdamW8bitSection(_AdamKnobs):
    name: Literal["adamw8bit"] = Field(..., description="bitsandbytes block-wise 8-bit AdamW.")


class SGDSection(_OptimizerCommon):
    name: Literal["sgd"] = Field(..., description="torch.optim.SGD.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum.")


class _GaLoreKnobs(Section):
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (before the update, as torch "
                                "AdamW), on matrices only.")
    rank: int = Field(128, ge=1, description="Rank r of the gradient subspace (paper: 128 for 1B, 1024 for 7B).")
    update_proj_gap: int = Field(200, ge=1, description="Steps between subspace refreshes (T).")
    scale: float = Field(0.25, gt=0, description="Scale α of the projected-back update.")
    proj_type: Literal["std", "reverse_std", "left", "right", "full"] = Field(
        "std", description="Which side is projected: 'std' the smaller one, 'full' both (r x r).")
    svd: Literal["exact", "randomized"] = Field("exact", description="Subspace from an exact SVD, or a "
                                                "randomized range finder (much cheaper on large matrices).")
    moments_on_refresh: Literal["keep", "reproject"] = Field(
        "keep", description="Moments when the subspace changes: kept as is (reference behaviour) or mapped "
        "into the new basis.")
    target_modules: list[str] | None = Field(None, description="Linear layers (name suffixes) optimised in "
                                             "low rank; default the attention and MLP projections. The rest "
                                             "(embeddings, norms, head) get plain updates.")
    layerwise: bool = Field(False, description="Step each parameter inside backward and free its gradient at "
                            "once (full gradients never coexist); accumulation happens in the low-rank space.")


class GaLoreAdamWSection(_GaLoreKnobs):
    name: Literal["galore_adamw"] = Field(..., description="GaLore AdamW (arXiv 2403.03507).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam moment coefficients.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")


class GaLoreAdamW8bitSection(GaLoreAdamWSection):
    name: Literal["galore_adamw8bit"] = Field(..., description="GaLore AdamW with block-wise 8-bit moments.")


class GaLoreAdafactorSection(_GaLoreKnobs):
    name: Literal["galore_adafactor"] = Field(..., description="GaLore with Adafactor's factored second moment "
                                              "(external lr schedule, relative_step off).")
    beta1: float | None = Field(None, ge=0, lt=1, description="First-moment coefficient; null keeps none.")


class NaturalGaLoreAdamWSection(GaLoreAdamWSection):
    name: Literal["natural_galore_adamw"] = Field(..., description="Natural GaLore (arXiv 2410.16029): low-rank "
                                                  "gradients preconditioned by the inverse empirical Fisher.")
    history_size: int = Field(20, ge=1, description="Low-rank gradients kept for the Fisher estimate (s).")
    damping: float = Field(1e-3, gt=0, description="Fisher damping λ.")
    history_on_refresh: Literal["clear", "keep"] = Field("clear", description="Gradient history when the "
                                                         "subspace changes (old gradients live in another basis).")


class MeZOSection(_OptimizerCommon):
    name: Literal["mezo"] = Field(..., description="MeZO zeroth-order SGD (arXiv 2305.17333): two forward "
                                  "passes per step, no backward, training memory = inference memory.")
    lr: float = Field(1e-6, gt=0, description="Learning rate (paper: 1e-6..1e-7 full, 1e-4..5e-5 LoRA).")
    eps: float = Field(1e-3, gt=0, description="Perturbation scale ε (paper: 1e-3 full, 1e-2 LoRA).")
    n_samples: int = Field(1, ge=1, description="SPSA estimates averaged per step (n-SPSA).")
    dropout: bool = Field(False, description="Keep dropout active in the forward passes (the paper uses eval "
                          "mode; with dropout ℓ₊ and ℓ₋ see different masks).")


OptimizerSection = Annotated[Union[AdamWSection, AdamW8bitSection, SGDSection, MeZOSection,  # noqa: UP007
                                   GaLoreAdamWSection, GaLoreAdamW8bitSection, GaLoreAdafactorSection,
                                   NaturalGaLoreAdamWSection],
                             Field(discriminator="name")]


# ------------------------------------------------------------------------------------- activations
class NoActivationCompression(Section):
    name: Literal["none"] = Field("none", description="Store activations as autograd does.")


class MesaSection(Section):
    name: Literal["mesa"] = Field(..., description="Mesa (arXiv 2111.11124): tensors saved for backward stored "
                                  "in 8 bits with per-group scale and offset; forward is exact.")
    bits: int = Field(8, ge=1, le=8, description="Bits per stored value.")
    group_size: int = Field(64, ge=1, description="Channels sharing one scale and offset.")
    rounding: Literal["stochastic", "nearest"] = Field("stochastic", description="Rounding to the grid.")
    momentum: float = Field(0.9, ge=0, lt=1, description="EMA momentum of the tracked ranges.")


class WTACRSSection(Section):
    name: Literal["wta_crs"] = Field(..., description="WTA-CRS (arXiv 2305.15265): Linear weight gradients (and, "
                                     "with sample_attention, eager attention's two matmuls) estimated from k = ratio "
                                     "x rows sampled winner-take-all; unbiased, only sampled rows stored.")
    ratio: float = Field(0.3, gt=0, le=1, description="Fraction of rows kept (paper: 0.3).")
    sample_attention: bool = Field(True, description="Also sample the summed dimension of QK^T and AV per batch "
                                   "and head, as the paper's memory setting does (needs model.attn_implementation "
                                   "eager; SDPA saves no attention matrix).")
    min_rows: int = Field(10, ge=1, description="Never keep fewer rows than this (the reference's minimal_k).")
    others: Literal["none", "mesa", "s2a"] = Field("none", description="Compressor for the tensors WTA-CRS does "
                                                   "not sample (nonlinearities, norms, attention).")


class S2ASection(Section):
    name: Literal["s2a"] = Field(..., description="S2A (arXiv 2503.08154): nonlinearities store a 4-bit index "
                                 "into a fitted piecewise-constant derivative; softmax outputs in 4 bits.")
    bits: int = Field(4, ge=1, le=8, description="Bits for the derivative index of pointwise nonlinearities.")
    softmax_bits: int = Field(4, ge=1, le=8, description="Bits for softmax outputs.")
    norm_bits: int = Field(8, ge=1, le=8, description="Bits for LayerNorm/RMSNorm inputs.")


ActivationsSection = Annotated[Union[NoActivationCompression, MesaSection, WTACRSSection, S2ASection],  # noqa: UP007
                               Field(discriminator="name")]


# ---------------------------------------------------------------------------------------------- loss
class CrossEntropySection(Section):
    name: Literal["cross_entropy"] = Field("cross_entropy", description="The model's own loss on full logits.")


class CutCrossEntropySection(Section):
    name: Literal["cut_cross_entropy"] = Field(..., description="Cut cross-entropy (arXiv 2411.09009): the loss "
                                               "from hidden states and the LM head block by block, never "
                                               "materialising the logits.")
    impl: Literal["auto", "torch", "triton"] = Field("auto", description="'auto': Triton kernels on CUDA, the "
                                                     "chunked torch path elsewhere.")


LossSection = Annotated[Union[CrossEntropySection, CutCrossEntropySection],  # noqa: UP007
                        Field(discriminator="name")]


# ------------------------------------------------------------------------------------------- adapter
class NoAdapter(Section):
    name: Literal["none"] = Field("none", description="Train the model's weights directly.")


class LoRASection(Section):
    name: Literal["lora"] = Field(..., description="LoRA adapters through peft (arXiv 2106.09685).")
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="Scale numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module name suffixes that receive adapters, or 'all-linear'.")


class LoRAMSection(Section):
    name: Literal["loram"] = Field(..., description="LoRAM (arXiv 2502.13533): train LoRA on a structurally "
                                   "pruned copy of the model (QLoRAM: also NF4-quantised), recover it onto the "
                                   "full model with `memft loram export`.")
    prune_ratio: float = Field(0.5, gt=0, lt=1, description="Fraction of MLP neurons and of KV heads (with their "
                               "query groups) removed in each pruned layer.")
    prune_method: Literal["random", "magnitude", "taylor"] = Field("magnitude", description="Which units to keep: "
                                                                  "random, largest weight norm, or first-order "
                                                                  "Taylor importance on calibration batches.")
    keep_dense_layers: tuple[int, int] | list[int] = Field((4, 2), description="Layers left unpruned: (first k, "
                                                          "last k) or an explicit list of layer indices.")
    quantize: Literal["none", "nf4"] = Field("none", description="'nf4': QLoRAM, the pruned model in 4-bit NF4 "
                                             "through bitsandbytes.")
    calibration_batches: int = Field(4, ge=1, description="Training batches used to score units (taylor).")
    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Projection names that receive adapters.")


AdapterSection = Annotated[Union[NoAdapter, LoRASection, LoRAMSection], Field(discriminator="name")]  # noqa: UP007


# --------------------------------------------------------------------------------------------- train
class TrainSection(Section):
    output_dir: str = Field("runs/quickstart", description="Directory for checkpoints, metrics and reports.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps to run.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch (per process).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to the peak lr.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of the peak (linear/cosine).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast precision for compute.")
    seed: int = Field(0, description="Seed for initialisation, data order and dropout.")
    log_every: int = Field(10, ge=1, description="Steps between metric lines in metrics.jsonl.")
    eval_every: int | None = Field(None, ge=1, description="Steps between evaluations (null: only at the end).")
    eval_batches: int | None = Field(None, ge=1, description="Evaluate on at most this many batches.")
    save_every: int | None = Field(None, ge=1, description="Steps between checkpoints (null: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints to keep.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when available.")


class FSDPOptions(Section):
    reshard_after_forward: bool = Field(True, description="Free each layer's gathered parameters after its "
                                        "forward and gather them again in backward (ZeRO-3-like, least "
                                        "memory); false keeps them until backward (ZeRO-2-like, less traffic).")
    cpu_offload: bool = Field(False, description="Keep sharded parameters, gradients and optimizer state in CPU "
                              "memory (torch CPUOffloadPolicy); the optimizer steps on the CPU.")


class DeepSpeedOptions(Section):
    stage: Literal[1, 2] = Field(2, description="ZeRO stage: 1 shards optimizer state, 2 also gradients. For "
                                 "sharded parameters use engine fsdp.")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="'cpu': optimizer state and step in "
                                                      "CPU memory (ZeRO-Offload).")


class DistributedSection(Section):
    engine: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
        "none", description="'none': one process; 'ddp': torch DistributedDataParallel; 'fsdp': torch FSDP2 "
        "(`fully_shard` on every decoder layer and the root); 'deepspeed': DeepSpeed ZeRO-1/2 through accelerate "
        "(needs the `deepspeed` extra). Gloo on CPU, NCCL on GPUs. `memft support` prints which methods each "
        "engine runs.")
    nproc_per_node: int = Field(2, ge=1, description="Processes `memft finetune` starts on this machine (through "
                                "torch.distributed.run); ignored when already launched by torchrun.")
    fsdp: FSDPOptions = Field(default_factory=FSDPOptions, description="Options for engine fsdp.")
    deepspeed: DeepSpeedOptions = Field(default_factory=DeepSpeedOptions, description="Options for engine "
                                        "deepspeed.")

    @model_validator(mode="after")
    def _options_match_engine(self) -> "DistributedSection":
        for engine in ("fsdp", "deepspeed"):
            options = getattr(self, engine)
            if options != type(options)() and self.engine != engine:
                raise ValueError(f"distributed.{engine} options apply to engine '{engine}' only, but engine is "
                                 f"'{self.engine}'; set distributed.engine={engine} or remove distributed.{engine}")
        return self


class MemorySection(Section):
    report: bool = Field(True, description="Write memory.json, memory.md and memory.png into output_dir.")
    track_steps: int = Field(3, ge=0, description="Account tensor storage exactly, by category, during the first "
                             "N optimizer steps (they include the first optimizer-state allocation, so they hold "
                             "the steady-state peak). Exact accounting intercepts every op and is slow; 0 "
                             "disables it. CUDA allocator peaks are recorded on GPUs for every step.")
    budget_gib: float | None = Field(None, gt=0, description="Warn when the measured peak exceeds this.")


class Recipe(Section):
    """A complete fine-tuning run."""

    model: ModelSection = Field(default_factory=ModelSection, description="Which model to load and how.")
    data: DataSection = Field(default_factory=DataSection, description="Datasets and tokenisation.")
    optimizer: OptimizerSection = Field(default_factory=AdamWSection, description="Optimizer and its knobs.")
    activations: ActivationsSection = Field(default_factory=NoActivationCompression,
                                            description="Activation compressor.")
    loss: LossSection = Field(default_factory=CrossEntropySection, description="Loss computation.")
    adapter: AdapterSection = Field(default_factory=NoAdapter, description="Parameter-efficient adapter.")
    train: TrainSection = Field(default_factory=TrainSection, description="Training loop settings.")
    distributed: DistributedSection = Field(default_factory=DistributedSection, description="Parallelism.")
    memory: MemorySection = Field(default_factory=MemorySection, description="Memory measurement and reports.")

    @model_validator(mode="before")
    @classmethod
    def _default_method_names(cls, data: Any) -> Any:
        """A method section without `name` takes the section's default method."""
        if isinstance(data, dict):
            defaults = {"optimizer": "adamw", "activations": "none", "loss": "cross_entropy", "adapter": "none"}
            for key, name in defaults.items():
                if isinstance(data.get(key), dict) and "name" not in data[key]:
                    data = {**data, key: {"name": name, **data[key]}}
        return data


# ------------------------------------------------------------------------------- loading and errors
MAX_YAML_NODES = 10_000  # a recipe has a few hundred; more means an alias bomb or a file that is no recipe
QUOTE_CHARS = 200  # longest user value quoted in an error
MAX_LISTED_PROBLEMS = 20


def shorten(text: str, limit: int = QUOTE_CHARS) -> str:
    """`text` cut to `limit` characters with "…", so a hostile value cannot flood an error message."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value), the value typed by YAML (`lr=1e-3` stays a string and
    pydantic converts it, `r=8` is an int, `packing=true` a bool, `x=null` None, `l=[a, b]` a list)."""
    quoted = shorten(text)
    if "=" not in text:
        raise RecipeError(f"Override '{quoted}' is not of the form key=value (for example train.max_steps=50).")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"Override '{quoted}' has an empty key part; write dotted keys like optimizer.lr=1e-3.")
    try:
        value = _load_yaml(raw, f"Override '{quoted}'") if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"Override '{quoted}': the value is not valid YAML ({shorten(str(exc.problem))}).") from exc
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = shorten(".".join(parts[: i + 1]))
                raise RecipeError(f"Override '{shorten(text)}': '{where}' is a value, not a section, so it has no "
                                  "keys.")
            node = child
        node[parts[-1]] = value
    return data


def _load_yaml(text: str, subject: str) -> Any:
    """`yaml.safe_load`, refusing before construction a document that expands to more than MAX_YAML_NODES
    nodes (each alias counted as a copy of its anchor: the "billion laughs" bomb), nests too deeply, or
    holds an unconvertible scalar. `subject` starts the error message ("Recipe file 'x.yaml'")."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_YAML_NODES, {}, set()) > MAX_YAML_NODES:
            raise RecipeError(f"{subject} expands to more than {MAX_YAML_NODES:,} YAML nodes (aliases counted as "
                              "copies of their anchors), but a recipe has a few hundred. Remove the repeated "
                              "aliases (*name) or write the values out.")
        return loader.construct_document(node)
    except RecursionError as exc:
        raise RecipeError(f"{subject} nests too deeply to be a recipe.") from exc
    except ValueError as exc:  # a scalar YAML resolves but cannot convert: 2024-13-01, a 5,000-digit int
        raise RecipeError(f"{subject} holds a value YAML cannot convert: {shorten(str(exc))} (quote it if "
                          "it is meant as text).") from exc
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, limit: int, sizes: dict, open_nodes: set) -> int:
    """Nodes under `node` with aliases expanded, counted up to just past `limit`; a recursive alias is infinite."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        return limit + 1
    open_nodes.add(key)
    children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                else node.value if isinstance(node, yaml.SequenceNode) else [])
    total = 1
    for child in children:
        total += _expanded_size(child, limit, sizes, open_nodes)
        if total > limit:
            break
    open_nodes.discard(key)
    sizes[key] = total
    return total


def load_recipe_data(path: str | Path) -> dict:
    """The recipe file's top-level mapping, before overrides and validation."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"Recipe file '{path}' does not exist or is not a file. Check the path, or run "
                          "`memft recipes` to list the shipped recipes.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"Recipe file '{path}' cannot be read: {exc.strerror}.") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(f"Recipe file '{path}' is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start} (line {line}) cannot be decoded. Save the recipe as UTF-8 YAML.") from exc
    try:
        data = _load_yaml(text, f"Recipe file '{path}'")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"Recipe file '{path}' is not valid YAML{where}: {shorten(problem)}.") from exc
    if data is None or data == {}:
        raise RecipeError(f"Recipe file '{path}' is empty (no settings), so it would train every default. Start "
                          "from a shipped recipe: `memft recipes` lists them; copy one, or run one by name with "
                          "key=value overrides (memft finetune quickstart train.max_steps=50).")
    if not isinstance(data, dict):
        raise RecipeError(f"Recipe file '{path}' must hold a mapping of sections (model, data, optimizer, ...), "
                          f"not a {type(data).__name__}.")
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError listing every problem."""
    data = load_recipe_data(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return validate_recipe(data, source=str(path) if path else "recipe")


def validate_recipe(data: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        lines = [shorten(_describe(err), 3 * QUOTE_CHARS) for err in errors[:MAX_LISTED_PROBLEMS]]
        if len(errors) > MAX_LISTED_PROBLEMS:
            lines.append(f"... and {len(errors) - MAX_LISTED_PROBLEMS} more")
        raise RecipeError(f"{source} has {len(errors)} problem{'s' * (len(errors) > 1)}:\n"
                          + "\n".join(f"  - {line}" for line in lines)) from exc


def _describe(err: dict) -> str:
    loc, parent = _walk(err["loc"])
    path = shorten(".".join(str(p) for p in loc)) or "(top level)"
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        known = _keys_of(parent)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else (f" Known keys: {', '.join(known)}." if known else "")
        return f"{path}: unknown key.{hint}"
    if kind == "union_tag_invalid":
        options = [o.strip(" '") for o in str(ctx.get("expected_tags", "")).split(",") if o.strip()]
        close = difflib.get_close_matches(str(ctx.get("tag")), options, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return (f"{path}.name: '{shorten(str(ctx.get('tag')))}' is not a known method; choose one of "
                f"{', '.join(options)}.{hint}")
    if kind == "missing":
        return f"{path}: required key is missing."
    return f"{path}: {shorten(err['msg'])} (got {shorten(repr(err.get('input')))})."


def _walk(loc: tuple) -> tuple[tuple, Any]:
    """Follow an error location through the schema. Returns the location without the union tags pydantic
    inserts (optimizer.galore_adamw.rank -> optimizer.rank) and the section holding its last key."""
    clean: list = []
    model: Any = Recipe
    parent: Any = None
    i = 0
    while i < len(loc):
        part, parent = loc[i], model
        clean.append(part)
        fields = model.model_fields if isinstance(model, type) else {}
        members = _members(fields[part].annotation) if isinstance(part, str) and part in fields else []
        model = members[0] if len(members) == 1 else None
        if len(members) > 1:
            by_tag = {_tag(m): m for m in members}
            if i + 1 < len(loc) and loc[i + 1] in by_tag:
                model, i = by_tag[loc[i + 1]], i + 1
            else:
                model = members
        i += 1
    return tuple(clean), parent


def _members(annotation) -> list:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    out = []
    for arg in get_args(annotation) or ():
        out += _members(arg)
    return out


def _tag(section: type[BaseModel]) -> str:
    return get_args(section.model_fields["name"].annotation)[0]


def _keys_of(section: Any) -> list[str]:
    if isinstance(section, list):  # a method section whose method is unknown: every method's keys
        return sorted({k for m in section for k in m.model_fields})
    return list(section.model_fields) if isinstance(section, type) else []


def method_names(section: str) -> list[str]:
    """Method names accepted by a tagged section, e.g. method_names('optimizer')."""
    return [_tag(m) for m in _members(Recipe.model_fields[section].annotation)]
