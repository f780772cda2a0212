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
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from memft import methods as _methods  # noqa: F401  (registers the built-in methods)
from memft.errors import RecipeError
from memft.methods import registry
from memft.methods.registry import Section
from memft.train.trackers import TRACKERS


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
    path: str = Field(..., description="Where the rows are: a bundled set ('memft:alpaca', 'memft:chat', "
                      "'memft:text'); a .jsonl/.json/.csv/.parquet/.txt file; a folder (the data files directly in "
                      "it) or a glob ('data/*.jsonl'), all of one format; a folder written by "
                      "`datasets.save_to_disk`; otherwise what `datasets.load_dataset` takes: a builder name "
                      "('json', 'csv', 'parquet', 'text') with `data_files`, a dataset folder or a hub id.")
    format: Literal["text", "alpaca", "chat"] = Field(..., description="'text': plain text in `text_field`; "
                                                     "'alpaca': instruction/input/output; 'chat': `messages` "
                                                     "with roles, rendered by the chat template (the tokenizer's, "
                                                     "or data.chat_template).")
    name: str | None = Field(None, description="Configuration name for `datasets.load_dataset` (a dataset with "
                             "several configurations); reads `path` through load_dataset.")
    data_files: str | list[str] | None = Field(None, description="Files or globs for `datasets.load_dataset`, "
                                               "e.g. path: json with data_files: [a.jsonl, b.jsonl]; reads "
                                               "`path` through load_dataset.")
    split: str = Field("train", description="Split to read from `datasets.load_dataset` or from a "
                       "`save_to_disk` folder of several splits; data files and folders have one split.")
    text_field: str = Field("text", description="Column holding the text for format 'text'.")
    max_examples: int | None = Field(None, ge=1, description="Use at most this many rows (first rows).")

    @model_validator(mode="after")
    def _load_dataset_options_need_load_dataset(self) -> "DatasetSource":
        if (self.name is not None or self.data_files is not None) and self.path.startswith("memft:"):
            raise ValueError(f"name and data_files are options of datasets.load_dataset, but path '{self.path}' is "
                             "a bundled set; remove them, or set path to a builder ('json', ...) or a hub id")
        return self


class MixSource(DatasetSource):
    weight: float = Field(..., gt=0, description="This source's share of the mixture, relative to the other "
                          "sources' weights (normalised to sum to 1).")


class DataSection(Section):
    train: DatasetSource | None = Field(default_factory=lambda: DatasetSource(path="memft:alpaca", format="alpaca"),
                                        description="Training data (one source; several go in `mix`).")
    mix: list[MixSource] | None = Field(None, description="Several training sources mixed by weight, instead of "
                                        "`train`. The mixture holds as many examples as the sources together; "
                                        "each source gives its weight's share of them, drawn (by train.seed) "
                                        "without repeats up to its size and repeating every example evenly "
                                        "beyond it; the mixture is then shuffled. The run's notes give each "
                                        "source's count.")
    eval: DatasetSource | None = Field(None, description="Evaluation data; if absent, `eval_fraction` of the "
                                       "training rows is held out (of each `mix` source, before mixing).")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of training rows held out for "
                                 "evaluation when `eval` is not given (0 disables evaluation).")
    max_seq_len: int = Field(256, ge=8, description="Examples are truncated to this many tokens (packed rows are "
                             "this long); must not exceed the model's maximum positions.")
    packing: bool = Field(False, description="Place several whole examples in each row of max_seq_len tokens "
                          "(longest first, each into the fullest row with room; the rest is padding). Position "
                          "ids restart at every example, so attention stays within it, and no token is trained to "
                          "predict the next example's first token: each example's loss is the one it has alone.")
    loss_on: Literal["response", "all"] = Field("response", description="For alpaca/chat: train only on "
                                                "response tokens ('response') or on every token ('all').")
    chat_template: str | None = Field(None, description="Chat template for format 'chat' instead of the "
                                      "tokenizer's: Jinja text, or the path of a .jinja file.")

    @model_validator(mode="after")
    def _one_training_source(self) -> "DataSection":
        if self.mix is not None:
            if self.train is not None and "train" in self.model_fields_set:
                raise ValueError("data.train and data.mix both give the training data; move data.train into "
                                 "data.mix (with a weight) or remove data.mix (data.train=null drops a recipe's "
                                 "data.train)")
            if len(self.mix) < 2:
                raise ValueError(f"data.mix mixes several sources, but it has {len(self.mix)}; for one source use "
                                 "data.train")
            self.train = None  # the mix is the training data
        elif self.train is None:
            raise ValueError("data.train is null; give a training source, or several in data.mix")
        sources = [*(self.mix or [self.train]), *([self.eval] if self.eval else [])]
        if self.chat_template is not None and all(s.format != "chat" for s in sources):
            raise ValueError("data.chat_template renders format 'chat', but no data source has format chat; "
                             "remove data.chat_template")
        return self


# --------------------------------------------------------------------------------------------- train
class TrainSection(Section):
    output_dir: str = Field("runs/quickstart", description="Directory for checkpoints, metrics and reports.")
    max_steps: int | None = Field(100, ge=1, description="Optimizer steps to run (unless `num_epochs` is given).")
    num_epochs: float | None = Field(None, gt=0, description="Run length in epochs of the training examples, "
                                     "instead of `max_steps` (which must then be left out or null); may be "
                                     "fractional. An epoch is floor(examples / (batch_size x processes)) "
                                     "micro-batches; the run is ceil(num_epochs x that / grad_accum) steps, said "
                                     "in the run's notes.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch (per process).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to the peak lr.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of the peak (linear/cosine).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast precision for compute.")
    seed: int = Field(0, description="Seed for initialisation, data order and dropout.")
    log_every: int = Field(10, ge=1, description="Steps between metric lines in metrics.jsonl, the trackers and "
                           "the console.")
    report_to: list[Literal[TRACKERS]] = Field(  # type: ignore[valid-type]
        default_factory=list, description="Experiment trackers that receive the metrics (accelerate's: "
        "tensorboard, wandb, mlflow, ...); files go to output_dir/trackers. One name or a list.")
    eval_every: int | None = Field(None, ge=1, description="Steps between evaluations (null: only at the end).")
    eval_batches: int | None = Field(None, ge=1, description="Evaluate on at most this many batches.")
    save_every: int | None = Field(None, ge=1, description="Steps between checkpoints (null: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints to keep.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when available.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_run_length(self) -> "TrainSection":
        if self.num_epochs is None:
            if self.max_steps is None:
                raise ValueError("train.max_steps is null and train.num_epochs is not set; set one of them")
        elif "max_steps" in self.model_fields_set and self.max_steps is not None:
            raise ValueError(f"train.max_steps={self.max_steps} and train.num_epochs={self.num_epochs:g} both set the "
                             "run's length; keep one (train.max_steps=null drops a recipe's max_steps)")
        else:
            self.max_steps = None  # set from the epochs once the data is read (memft.train.data.with_run_length)
        return self


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


class _RecipeBase(Section):
    """A complete fine-tuning run; `_recipe_class` adds the method sections from the registry."""

    model: ModelSection = Field(default_factory=ModelSection, description="Which model to load and how.")
    data: DataSection = Field(default_factory=DataSection, description="Datasets and tokenisation.")

    @model_validator(mode="before")
    @classmethod
    def _default_method_names(cls, data: Any) -> Any:
        """A method section without `name` takes the section's default method."""
        if isinstance(data, dict):
            for key, name in registry.DEFAULTS.items():
                if isinstance(data.get(key), dict) and "name" not in data[key]:
                    data = {**data, key: {"name": name, **data[key]}}
        return data


METHOD_HELP = {"optimizer": "Optimizer and its knobs.", "activations": "Activation compressor.",
               "loss": "Loss computation.", "adapter": "Parameter-efficient adapter."}


def _recipe_class() -> type[_RecipeBase]:
    """The Recipe model: one tagged union per method section, from the methods registered now, then the
    loop's sections (the order of a recipe file)."""
    fields: dict[str, Any] = {
        section: (registry.union(section), Field(default_factory=registry.get(section, registry.DEFAULTS[section]).schema,
                                                 description=METHOD_HELP[section]))
        for section in registry.SECTIONS}
    fields["train"] = (TrainSection, Field(default_factory=TrainSection, description="Training loop settings."))
    fields["distributed"] = (DistributedSection, Field(default_factory=DistributedSection, description="Parallelism."))
    fields["memory"] = (MemorySection, Field(default_factory=MemorySection, description="Memory measurement and "
                                                                                        "reports."))
    return create_model("Recipe", __base__=_RecipeBase, __module__=__name__, **fields)


Recipe = _recipe_class()


def refresh_methods() -> None:
    """Rebuild `Recipe` after a method was registered (or removed) once this module was imported."""
    global Recipe
    Recipe = _recipe_class()


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


# Key names of Hugging Face TrainingArguments (and TRL, PEFT) and LLaMA-Factory configs, found anywhere in a
# recipe: name -> (memft key, or key=value, or None where memft has none; a note).
FOREIGN_KEYS: dict[str, tuple[str | None, str]] = {
    "model_name_or_path": ("model.name_or_path", ""),
    "torch_dtype": ("model.dtype", ""),
    "flash_attn": ("model.attn_implementation", "eager or sdpa"),
    "attn_implementation": ("model.attn_implementation", ""),
    "trust_remote_code": ("model.trust_remote_code", ""),
    "revision": ("model.revision", ""),
    "model_revision": ("model.revision", ""),
    "gradient_checkpointing": ("model.gradient_checkpointing", ""),
    "dataset": ("data.train.path", "with data.train.format: text, alpaca or chat"),
    "eval_dataset": ("data.eval.path", "with data.eval.format"),
    "dataset_text_field": ("data.train.text_field", ""),
    "cutoff_len": ("data.max_seq_len", ""),
    "max_seq_length": ("data.max_seq_len", ""),
    "max_length": ("data.max_seq_len", ""),
    "packing": ("data.packing", ""),
    "max_samples": ("data.train.max_examples", ""),
    "val_size": ("data.eval_fraction", ""),
    "train_on_prompt": ("data.loss_on=all", "data.loss_on=response learns only the responses"),
    "template": ("data.chat_template", "Jinja text or a .jinja file, not a LLaMA-Factory template name"),
    "learning_rate": ("optimizer.lr", ""),
    "weight_decay": ("optimizer.weight_decay", ""),
    "adam_beta1": ("optimizer.betas", "a pair [beta1, beta2]"),
    "adam_beta2": ("optimizer.betas", "a pair [beta1, beta2]"),
    "adam_epsilon": ("optimizer.eps", ""),
    "optim": ("optimizer.name", "`memft schema optimizer` lists the optimizers"),
    "use_galore": ("optimizer.name=galore_adamw", "or galore_adamw8bit, galore_adafactor"),
    "galore_rank": ("optimizer.rank", "with optimizer.name=galore_adamw"),
    "galore_target": ("optimizer.target_modules", "with optimizer.name=galore_adamw"),
    "galore_update_interval": ("optimizer.update_proj_gap", "with optimizer.name=galore_adamw"),
    "galore_scale": ("optimizer.scale", "with optimizer.name=galore_adamw"),
    "galore_proj_type": ("optimizer.proj_type", "with optimizer.name=galore_adamw"),
    "galore_layerwise": ("optimizer.layerwise", "with optimizer.name=galore_adamw"),
    "finetuning_type": ("adapter.name", "lora or loram; none trains every weight"),
    "lora_rank": ("adapter.r", "with adapter.name=lora"),
    "lora_alpha": ("adapter.alpha", "with adapter.name=lora"),
    "lora_dropout": ("adapter.dropout", "with adapter.name=lora"),
    "lora_target": ("adapter.target_modules", "with adapter.name=lora"),
    "quantization_bit": (None, "only LoRAM's pruned model is quantised (adapter.name=loram, adapter.quantize=nf4)"),
    "output_dir": ("train.output_dir", ""),
    "max_steps": ("train.max_steps", ""),
    "num_train_epochs": ("train.num_epochs", "instead of train.max_steps"),
    "per_device_train_batch_size": ("train.batch_size", ""),
    "per_device_eval_batch_size": (None, "evaluation uses train.batch_size; train.eval_batches caps the batches"),
    "gradient_accumulation_steps": ("train.grad_accum", ""),
    "lr_scheduler_type": ("train.lr_schedule", "constant, linear or cosine"),
    "warmup_steps": ("train.warmup_steps", ""),
    "warmup_ratio": ("train.warmup_steps", "a number of steps, not a fraction"),
    "max_grad_norm": ("train.max_grad_norm", ""),
    "bf16": ("train.mixed_precision=bf16", ""),
    "fp16": ("train.mixed_precision=fp16", ""),
    "seed": ("train.seed", ""),
    "logging_steps": ("train.log_every", ""),
    "eval_steps": ("train.eval_every", ""),
    "eval_strategy": ("train.eval_every", "steps between evaluations; null: only at the end"),
    "evaluation_strategy": ("train.eval_every", "steps between evaluations; null: only at the end"),
    "save_steps": ("train.save_every", ""),
    "save_strategy": ("train.save_every", "steps between checkpoints; null: only at the end"),
    "save_total_limit": ("train.keep_checkpoints", ""),
    "use_cpu": ("train.device=cpu", ""),
    "no_cuda": ("train.device=cpu", ""),
    "report_to": ("train.report_to", "tensorboard, wandb, mlflow, ..."),
    "logging_dir": (None, "trackers write under train.output_dir/trackers, metrics.jsonl beside it"),
    "resume_from_checkpoint": (None, "pass --resume [CHECKPOINT] to `memft finetune`"),
    "overwrite_output_dir": (None, "pass --overwrite to `memft finetune`"),
    "deepspeed": ("distributed.engine=deepspeed", "ZeRO options under distributed.deepspeed, no JSON file"),
    "fsdp": ("distributed.engine=fsdp", "options under distributed.fsdp"),
}


def _foreign_hint(name: str) -> str:
    """Where a Hugging Face / LLaMA-Factory key (or a memft key in the wrong section) goes in a recipe."""
    target, note = FOREIGN_KEYS[name]
    if target is None:
        return f" '{name}' is a Hugging Face / LLaMA-Factory name; memft has no such setting: {note}."
    note = f" ({note})" if note else ""
    if target.split("=")[0].rsplit(".", 1)[-1] == name:
        return f" Did you mean {target}?{note}"
    return f" '{name}' is a Hugging Face / LLaMA-Factory name; in memft it is {target}{note}."


def _describe(err: dict) -> str:
    loc, parent = _walk(err["loc"])
    path = shorten(".".join(str(p) for p in loc)) or "(top level)"
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        if loc[-1] in FOREIGN_KEYS:
            return f"{path}: unknown key.{_foreign_hint(str(loc[-1]))}"
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
        if isinstance(part, int):  # an item of a list of sections (data.mix.0): the keys are the section's
            i += 1
            continue
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
