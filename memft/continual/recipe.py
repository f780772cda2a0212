"""Recipes of `memft continual` (task sequences) and `memft edit` (lifelong editing with WISE).

Both are YAML files read and overridden by dotted `key=value` pairs exactly as fine-tuning recipes
(memft.train.recipe: `load_recipe_data`, `apply_overrides`), then validated by the pydantic models below:
unknown keys are errors with a "did you mean", every problem is reported at once with its path, and each
field has a help text. The top-level `kind` (`continual` or `edit`) tells these recipes apart from
fine-tuning recipes (which have no `kind`).

A continual recipe's `optimizer` and `loss` sections are the fine-tuning recipe's own (the registered
method unions of memft.methods, same schemas and defaults; the default optimizer is adamw at the continual
learning rate 2e-3). Settings a continual method cannot run with are refused when the recipe is validated
(`combination_problems`), with the reason.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from memft.continual.base import LLAMA_LINEAR
from memft.continual.generate import TASKS
from memft.errors import RecipeError
from memft.methods import registry
from memft.train import recipe as finetune_recipe
from memft.train.recipe import ModelSection, apply_overrides, load_recipe_data

BUNDLED_EDITS = "memft:edits"
FINETUNE_SECTIONS = {"data", "optimizer", "activations", "loss", "adapter", "distributed", "memory"}
CONTINUAL_LR = 2e-3  # learning rate of the default optimizer (adapters train at a higher rate)
MOVED_TO_OPTIMIZER = ("lr", "weight_decay")  # former train keys, now optimizer keys

OptimizerSection = registry.union("optimizer")
LossSection = registry.union("loss")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _linear_names() -> list[str]:
    return list(LLAMA_LINEAR)


# ------------------------------------------------------------------------------------------- methods
class LoRAMethod(Section):
    name: Literal["lora"] = Field(..., description="Sequential LoRA (arXiv 2106.09685): one adapter trained on "
                                  "task after task; the baseline that forgets.")
    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: updates are scaled by alpha / r.")
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=_linear_names, description="Linear "
                                                              "name suffixes that get adapters, or 'all-linear'.")


class ILoRAMethod(LoRAMethod):
    name: Literal["ilora"] = Field(..., description="I-LoRA (arXiv 2402.18865): fast and slow (EMA) LoRA with "
                                   "reservoir replay and a hidden-state consistency loss.")
    ema_lambda: float = Field(0.25, ge=0, lt=1, description="slow <- lambda * slow + (1 - lambda) * fast after "
                              "every step.")
    buffer_size: int = Field(500, ge=1, description="Reservoir replay buffer capacity (examples).")
    replay_batch_size: int | None = Field(None, ge=1, description="Replayed examples per step (null: the batch "
                                          "size).")
    consistency_weight: float = Field(1.0, ge=0, description="Weight of the fast-to-slow hidden-state MSE on "
                                      "replayed data.")
    eval_adapter: Literal["slow", "fast"] = Field("slow", description="Adapter evaluated after each task.")
    seed: int = Field(0, description="Replay buffer RNG seed.")


class MoRAMethod(Section):
    name: Literal["mora"] = Field(..., description="MoRA (arXiv 2506.21035): per task r rank-1 experts that "
                                  "route themselves by their key activations; old experts frozen.")
    r: int = Field(8, ge=1, description="Rank-1 experts added per task and layer.")
    top_k: int = Field(8, ge=1, description="Activation budget: experts kept per token.")
    tau: float = Field(0.02, gt=0, description="Softmax temperature of the expert weights (reference 0.01-0.03).")
    delta: float = Field(0.2, ge=-1, le=1, description="Test-time relevance threshold: experts below it are off.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator alpha / r of the current task's experts.")
    relevance: Literal["l2", "cosine"] = Field("l2", description="'l2': A x normalised over all experts (the "
                                               "paper); 'cosine': each expert's own cosine similarity.")
    target_modules: list[str] = Field(default_factory=_linear_names, description="Linear name suffixes that get "
                                      "experts.")
    seed: int = Field(0, description="Seed of the expert initialisation.")
    input_subspace_energy: float | None = Field(None, gt=0, lt=1, description="null: the paper's free keys. A "
                                                "fraction in (0, 1): new experts' keys stay orthogonal to the "
                                                "input subspace holding that share of earlier tasks' input "
                                                "energy (a memft extension; 0.95 stops forgetting on the "
                                                "bundled suite).")


METHOD_SECTIONS: dict[str, type[Section]] = {"lora": LoRAMethod, "ilora": ILoRAMethod, "mora": MoRAMethod}
TAGGED = ("method", "optimizer", "loss")  # tagged union sections of a continual recipe
MethodSection = Annotated[Union[LoRAMethod, ILoRAMethod, MoRAMethod], Field(discriminator="name")]  # noqa: UP007


# --------------------------------------------------------------------------------------------- tasks
class TaskFile(Section):
    train: str = Field(..., description="JSON-lines file with instruction / input / output columns.")
    eval: str | None = Field(None, description="Evaluation file; if absent, `eval_fraction` of the train rows "
                             "are held out.")
    name: str | None = Field(None, description="Task name (default: the train file name up to its first dot).")


class TasksSection(Section):
    suite: list[Literal[tuple(TASKS)]] | None = Field(  # type: ignore[valid-type]
        None, description=f"Bundled synthetic tasks in training order (any of {', '.join(TASKS)}); used when "
        "`files` is not given (default: all four).")
    files: list[TaskFile] | None = Field(None, description="Your own tasks, in training order.")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="Share of a task file held out for evaluation "
                                 "when it has no eval file.")

    @model_validator(mode="after")
    def _one_source(self) -> TasksSection:
        if self.suite is not None and self.files is not None:
            raise ValueError("give either suite (bundled tasks) or files (your own), not both")
        if self.files is not None and not self.files or self.suite is not None and not self.suite:
            raise ValueError("the task list is empty; name at least one task")
        return self


class ContinualTrainSection(Section):
    steps_per_task: int = Field(100, ge=1, description="Optimizer steps on each task (a fresh optimizer per "
                                "task, constant learning rate).")
    batch_size: int = Field(8, ge=1, description="Sequences per step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm; null disables.")
    max_seq_len: int = Field(256, ge=8, description="Longest example in tokens; longer rows are refused.")
    eval_batch_size: int = Field(64, ge=1, description="Sequences per evaluation batch.")
    max_eval_examples: int | None = Field(None, ge=1, description="Evaluate on at most this many rows per task.")
    prompt_format: Literal["alpaca", "compact"] = Field("alpaca", description="'alpaca': the alpaca template; "
                                                        "'compact': 'INSTRUCTION INPUT\\nAnswer:' (short, for "
                                                        "small models).")
    seed: int = Field(0, description="Seed of the data order and initialisation.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when available.")

    @model_validator(mode="before")
    @classmethod
    def _moved_to_optimizer(cls, data: Any) -> Any:
        moved = [key for key in MOVED_TO_OPTIMIZER if isinstance(data, dict) and key in data]
        if moved:
            raise ValueError(" and ".join(f"train.{key}" for key in moved) + " moved to the optimizer section (the "
                             "fine-tuning recipe's): write " + " and ".join(f"optimizer.{key}" for key in moved)
                             + f" instead, e.g. optimizer.{moved[0]}={data[moved[0]]}")
        return data


def _default_optimizer() -> Section:
    return registry.get("optimizer", "adamw").schema(lr=CONTINUAL_LR)


def _default_loss() -> Section:
    return registry.get("loss", registry.DEFAULTS["loss"]).schema()


def _with_defaults(data: dict, key: str) -> dict:
    """A method section without `name` takes the default method (as in the fine-tuning recipe)."""
    section = data.get(key)
    if not isinstance(section, dict):
        return data
    if "name" not in section:
        section = {"name": registry.DEFAULTS[key], **section}
    return {**data, key: section}


class ContinualRecipe(Section):
    """A task sequence: train a method on tasks in order and measure forgetting."""

    kind: Literal["continual"] = Field("continual", description="Recipe kind (`memft continual`).")
    model: ModelSection = Field(default_factory=ModelSection, description="Which model to load and how.")
    method: MethodSection = Field(default_factory=lambda: LoRAMethod(name="lora"), description="Continual "
                                  "method and its knobs (name: lora, ilora or mora).")
    tasks: TasksSection = Field(default_factory=TasksSection, description="Tasks, in training order.")
    train: ContinualTrainSection = Field(default_factory=ContinualTrainSection, description="How each task is "
                                         "trained and evaluated.")
    optimizer: OptimizerSection = Field(default_factory=_default_optimizer, description="Optimizer of the "
                                        "method's trainable parameters, a fresh one per task: the fine-tuning "
                                        "recipe's optimizer section (adamw, adamw8bit, sgd, mezo, the galore "
                                        f"family). Without the section: adamw with lr {CONTINUAL_LR}; a section's "
                                        "own defaults are the fine-tuning recipe's. GaLore projects the method's "
                                        "matrices.")
    loss: LossSection = Field(default_factory=_default_loss, description="Loss computation: the fine-tuning "
                              "recipe's loss section (cross_entropy, or cut_cross_entropy for methods whose loss "
                              "is the model's own).")
    output_dir: str = Field("runs/continual", description="Directory for the checkpoint, results.json, "
                            "results.md and accuracy.png.")

    @model_validator(mode="before")
    @classmethod
    def _default_method_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("method"), dict) and "name" not in data["method"]:
            data = {**data, "method": {"name": "lora", **data["method"]}}
        if isinstance(data, dict):
            data = _with_defaults(_with_defaults(data, "optimizer"), "loss")
        return data

    @model_validator(mode="after")
    def _combinations(self) -> ContinualRecipe:
        problems = combination_problems(self.method.name, self.method, self.optimizer, self.loss,
                                        self.train.max_grad_norm, self.model)
        if problems:
            raise ValueError("The recipe combines settings that cannot work together: "
                             + " ".join(f"({i}) {p}." for i, p in enumerate(problems, 1)))
        return self


# ---------------------------------------------------------------------------------- combinations
_MEZO_ILORA = ("runs the loss 2 x n_samples times per step at perturbed weights, but I-LoRA's loss draws a "
               "replay batch from its reservoir and adds the current batch to it each time it runs: the "
               "perturbed passes would score different replay batches (no finite difference of one function) "
               "and every batch would enter the buffer several times; use a backprop optimizer (adamw, "
               "adamw8bit, sgd or the galore family) with method ilora")
_MEZO_MORA_KEYS = ("runs its forward passes in eval mode (optimizer.dropout false), in which MoRA records no "
                   "inputs of the task, so method.input_subspace_energy would protect nothing; set "
                   "optimizer.dropout true (train-mode passes) or method.input_subspace_energy null")
_LOSS_ILORA = ("replaces the loss the model computes from labels, but I-LoRA computes its cross-entropies "
               "itself, from the logits of one forward pass over current and replayed rows (each with its own "
               "mean), beside the hidden-state consistency term: the patched loss would never run; use loss "
               "cross_entropy with method ilora")


def step_recipe(optimizer: Section, loss: Section, max_grad_norm: float | None,
                model: ModelSection | None = None):
    """The fine-tuning recipe the shared builders and refusals see for a continual run: its optimizer, loss,
    model and gradient clipping, everything else at the fine-tuning defaults (one process, no adapter, no
    activation compression, no mixed precision)."""
    return finetune_recipe.Recipe.model_validate({"model": model or ModelSection(), "optimizer": optimizer,
                                                  "loss": loss, "train": {"max_grad_norm": max_grad_norm}})


def combination_problems(method: str, options: Any, optimizer: Section, loss: Section,
                         max_grad_norm: float | None = 1.0, model: ModelSection | None = None) -> list[str]:
    """Why the continual `method` (its name and options) cannot train with this optimizer and loss section
    (empty when it can): the registered refusals of the optimizer and loss methods, then what a continual
    method's training loss needs. I-LoRA's consistency loss and MoRA's routing are ordinary differentiable
    losses, so every backprop optimizer (layer-wise GaLore included) runs them; MeZO runs sequential LoRA and
    MoRA (their losses are pure functions of the weights; MoRA's input_subspace_energy records inputs in
    train mode only, so it needs optimizer.dropout true) but not I-LoRA (its loss changes the replay buffer);
    cut cross-entropy needs the method's loss to be the model's own loss from labels (LoRA, MoRA); a GaLore
    rank above method.r compresses nothing."""
    recipe = step_recipe(optimizer, loss, max_grad_norm, model)
    problems: list[str] = []
    for section in ("optimizer", "loss"):
        problems += registry.get(section, getattr(recipe, section).name).refuses(recipe)
    zeroth_order = registry.get("optimizer", optimizer.name).step_kind(optimizer) == "zeroth_order"
    if zeroth_order and method == "ilora":
        problems.append(f"optimizer {optimizer.name} {_MEZO_ILORA}")
    if (zeroth_order and method == "mora" and getattr(options, "input_subspace_energy", None) is not None
            and not getattr(optimizer, "dropout", False)):
        problems.append(f"optimizer {optimizer.name} {_MEZO_MORA_KEYS}")
    if registry.get("loss", loss.name).build is not None and method == "ilora":
        problems.append(f"loss {loss.name} {_LOSS_ILORA}")
    rank, r = getattr(optimizer, "rank", None), getattr(options, "r", None)
    if rank is not None and r is not None and rank > r:
        problems.append(f"optimizer.rank={rank} is above method.r={r}: {optimizer.name} projects the continual "
                        f"method's trainable matrices (r x d keys or factors, d x r values), whose smaller side is "
                        f"r, so no gradient would be compressed; set optimizer.rank to at most {r}")
    return problems


def optimizer_section(value: Any = None) -> Section:
    """An optimizer section from a section, a dict (`name` defaults to adamw) or None (adamw, lr 2e-3)."""
    return _section("optimizer", value)


def loss_section(value: Any = None) -> Section:
    """A loss section from a section, a dict (`name` defaults to cross_entropy) or None."""
    return _section("loss", value)


def _section(key: str, value: Any) -> Section:
    if isinstance(value, BaseModel):
        return value
    if value is None:
        return _default_optimizer() if key == "optimizer" else _default_loss()
    if not isinstance(value, dict):
        raise TypeError(f"{key} must be a dict or a recipe {key} section, got {type(value).__name__}.")
    data = _with_defaults({key: value}, key)[key]
    union = OptimizerSection if key == "optimizer" else LossSection
    try:
        return TypeAdapter(union).validate_python(data)
    except ValidationError as exc:
        lines = [_describe_in(key, err) for err in exc.errors()]
        raise ValueError(f"{key}: " + "; ".join(lines)) from exc


def _describe_in(key: str, err: dict) -> str:
    loc = list(err["loc"])
    if loc and loc[0] in _tags(key):
        del loc[0]
    where = ".".join(str(p) for p in [key, *loc])
    return f"{where}: {err['msg'].removeprefix('Value error, ')}"


def _tags(key: str) -> dict[str, type[BaseModel]]:
    """Tag -> schema of a tagged section of the continual recipe (method, optimizer, loss)."""
    if key == "method":
        return dict(METHOD_SECTIONS)
    return {m.name: m.schema for m in registry.methods(key)}


# --------------------------------------------------------------------------------------------- edits
class WISESection(Section):
    layer: str | None = Field(None, description="Module path of the FFN down projection to edit (null: the one "
                              "of decoder layer int(0.85 * layers)).")
    alpha: float = Field(5.0, gt=0, description="Unrelated inputs are pushed below this routing score.")
    beta: float = Field(20.0, gt=0, description="Edits are pushed above this routing score.")
    gamma: float = Field(10.0, ge=0, description="Margin between edit and unrelated routing scores.")
    mask_ratio: float = Field(0.2, gt=0, le=1, description="Fraction of the side memory each shard trains.")
    edit_lr: float = Field(1.0, gt=0, description="SGD learning rate of an edit.")
    n_iter: int = Field(70, ge=1, description="Optimisation steps per edit.")
    stop_loss: float = Field(0.02, ge=0, description="An edit stops early below this loss.")
    norm_constraint: float | None = Field(1.0, gt=0, description="Side memory stays within +- this of the "
                                          "original weights; null: unconstrained.")
    act_ratio: float = Field(0.88, gt=0, description="Routing threshold = act_ratio x the smallest routing "
                             "score of the memory's edits.")
    shard_size: int = Field(500, ge=1, description="Edits per shard (a shard is stored after this many).")
    merge_every: int = Field(1000, ge=1, description="Stored shards are TIES-merged every this many edits (a "
                             "multiple of shard_size).")
    mode: Literal["merge", "retrieve"] = Field("merge", description="'merge': one merged memory; 'retrieve': a "
                                               "memory per merge, the most activated answers.")
    density: float = Field(0.53, gt=0, le=1, description="TIES trimming density.")
    num_prefixes: int = Field(4, ge=0, description="Generated prefixes the edit is also trained under.")
    prefix_length: int = Field(5, ge=1, description="Tokens per generated prefix.")
    seed: int = Field(0, description="Seed of the gradient masks and prefixes.")

    @model_validator(mode="after")
    def _whole_shards(self) -> WISESection:
        if self.merge_every % self.shard_size:
            raise ValueError(f"merge_every ({self.merge_every}) must be a multiple of shard_size "
                             f"({self.shard_size}): merging combines whole shards")
        return self


class EditsSection(Section):
    path: str = Field(BUNDLED_EDITS, description="JSON-lines edits: prompt, target (with its leading space), "
                      "loc_prompt; optional rephrase (or paraphrase) and locality_prompt / locality_target. "
                      f"'{BUNDLED_EDITS}': the bundled counterfactual edits.")
    limit: int | None = Field(None, ge=1, description="Apply only the first N edits (T).")


class EditRecipe(Section):
    """Lifelong editing: write edits into a WISE side memory, then measure Rel / Gen / Loc after all."""

    kind: Literal["edit"] = Field("edit", description="Recipe kind (`memft edit`).")
    model: ModelSection = Field(default_factory=ModelSection, description="Which model to load and how.")
    edits: EditsSection = Field(default_factory=EditsSection, description="The edits, applied in order.")
    wise: WISESection = Field(default_factory=WISESection, description="WISE knobs (arXiv 2405.14768).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when available.")
    output_dir: str = Field("runs/edit", description="Directory for scores.json, scores.md and the side memory "
                            "(wise.safetensors + wise.json).")


# ------------------------------------------------------------------------------- loading and errors
def load_continual_recipe(path: str | Path | None, overrides: list[str] | None = None) -> ContinualRecipe:
    """Read, override and validate a continual recipe; RecipeError lists every problem."""
    return _load(ContinualRecipe, path, overrides)


def load_edit_recipe(path: str | Path | None, overrides: list[str] | None = None) -> EditRecipe:
    """Read, override and validate an edit recipe; RecipeError lists every problem."""
    return _load(EditRecipe, path, overrides)


def _load(schema: type[Section], path: str | Path | None, overrides: list[str] | None):
    data = load_recipe_data(path) if path is not None else {}
    kind = schema.model_fields["kind"].default
    finetune_keys = sorted(set(data) & (FINETUNE_SECTIONS - set(schema.model_fields)))  # sections it lacks
    if "kind" not in data and finetune_keys:
        raise RecipeError(f"Recipe '{path}' looks like a fine-tuning recipe (it has {', '.join(finetune_keys)} and "
                          f"no `kind`): run it with `memft finetune`, or write a {kind} recipe with `kind: {kind}` "
                          f"(see `memft recipes`).")
    if data.get("kind", kind) != kind:
        command = "finetune" if data.get("kind") is None else data["kind"]
        raise RecipeError(f"Recipe '{path}' has kind '{data.get('kind')}', not '{kind}': run it with `memft "
                          f"{command}`, or set `kind: {kind}` if it is a {kind} recipe.")
    data = apply_overrides(data, overrides or [])
    source = str(path) if path is not None else "recipe"
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(schema, err) for err in exc.errors()]
        raise RecipeError(f"{source} has {len(lines)} problem{'s' * (len(lines) > 1)}:\n"
                          + "\n".join(f"  - {line}" for line in lines)) from exc


def _describe(schema: type[BaseModel], err: dict) -> str:
    loc = list(err["loc"])
    if len(loc) > 1 and loc[0] in TAGGED and loc[1] in _tags(loc[0]):  # drop the union tag pydantic adds
        del loc[1]
    path = ".".join(str(p) for p in loc) or "(top level)"
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "value_error" and not loc:
        return err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        known = _known_keys(schema, err["loc"][:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else (f" Known keys: {', '.join(known)}." if known else "")
        return f"{path}: unknown key.{hint}"
    if kind == "union_tag_invalid":
        return f"{path}.name: '{ctx.get('tag')}' is not a known method; choose one of {ctx.get('expected_tags')}."
    if kind == "missing":
        return f"{path}: required key is missing."
    if kind == "value_error":
        return f"{path}: {err['msg'].removeprefix('Value error, ')}."
    return f"{path}: {err['msg']} (got {err.get('input')!r})."


def _known_keys(schema: type[BaseModel], loc: tuple) -> list[str]:
    """Keys of the section at `loc` (pydantic's location, union tags included)."""
    model: Any = schema
    tags: dict[str, type[BaseModel]] = {}
    for part in loc:
        if part in tags:
            model, tags = tags[part], {}
        elif isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            annotation = model.model_fields[part].annotation
            model = _first_model(annotation)
            tags = _tags(part) if part in TAGGED else {}
        elif isinstance(part, int):
            continue
        else:
            return []
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _first_model(annotation) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _first_model(arg)
        if found is not None:
            return found
    return None
