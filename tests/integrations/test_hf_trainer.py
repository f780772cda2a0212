"""memft in a real ``transformers.Trainer`` on the bundled tiny Llama (CPU): GaLore (plain and layer-wise), MeZO,
cut cross-entropy and an activation compressor train; resumed runs repeat an uninterrupted run's losses; memory
figures reach the reporting callbacks; optimizer knobs reach the param groups."""

from __future__ import annotations

from types import SimpleNamespace
from typing import get_args

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from memft.integrations import (
    ForwardOnlyStep,
    MemftCallback,
    MemftTrainer,
    apply_memft,
    memft_optimizer,
    memft_optimizer_cls_and_kwargs,
    optimizer_step_kind,
)
from memft.memory import CATEGORIES
from memft.optimizers.galore import GaLoreAdamW, galore_param_groups
from memft.optimizers.layerwise import LayerwiseOptimizer
from memft.optimizers.mezo import MeZO
from memft.train.data import build_splits, collate
from memft.train.models import resolve_model_path
from memft.train.recipe import DataSection, Recipe
from tests.conftest import FakeAllocator

MODEL = resolve_model_path("memft:tiny-llama")


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(MODEL)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def rows(tokenizer):
    data = DataSection.model_validate({"train": {"path": "memft:alpaca", "format": "alpaca", "max_examples": 48},
                                       "max_seq_len": 48, "eval_fraction": 0})
    return build_splits(data, tokenizer, seed=0).train


@pytest.fixture(scope="module")
def probe(rows, tokenizer):
    """A fixed batch of training rows and the untrained model's loss on it."""
    batch = collate(rows[:16], tokenizer.pad_token_id)
    return batch, probe_loss(load_model(), batch)


def load_model():
    return AutoModelForCausalLM.from_pretrained(MODEL)


@torch.no_grad()
def probe_loss(model, batch) -> float:
    model.eval()
    return float(model(**batch).loss)


class LogRecorder(TrainerCallback):
    """A reporting callback: keeps a copy of every log dict it receives."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({**logs, "step": state.global_step})

    def losses(self) -> list[float]:
        return [entry["loss"] for entry in self.logs if "loss" in entry]


def make_args(out, **overrides) -> TrainingArguments:
    settings = {"max_steps": 6, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                "learning_rate": 3e-3, "lr_scheduler_type": "constant", "max_grad_norm": 0.0, "logging_steps": 1,
                "save_strategy": "no", "report_to": [], "use_cpu": True, "disable_tqdm": True, "seed": 0,
                **overrides}
    return TrainingArguments(output_dir=str(out), **settings)


def fit(trainer_cls, model, args, rows, tokenizer, optimizers=(None, None), callbacks=(), resume=None, **kwargs):
    """Train with a fresh LogRecorder first among the user callbacks; returns (trainer, recorder)."""
    recorder = LogRecorder()
    trainer = trainer_cls(model=model, args=args, train_dataset=rows, optimizers=optimizers,
                          data_collator=lambda examples: collate(examples, tokenizer.pad_token_id),
                          callbacks=[recorder, *callbacks], **kwargs)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def linear_decay(optimizer, steps):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / (2 * steps))


# ------------------------------------------------------------------------------------------------ GaLore
def galore(model, layerwise: bool):
    groups = galore_param_groups(model, rank=4, update_proj_gap=2, scale=1.0)
    if layerwise:  # full gradient on refresh steps: the same trajectory as the ordinary optimizer
        return LayerwiseOptimizer(groups, GaLoreAdamW, lr=3e-3, refresh_grad="accumulated")
    return GaLoreAdamW(groups, lr=3e-3)


@pytest.fixture(scope="module")
def galore_runs(tmp_path_factory, rows, tokenizer):
    """Per mode: the uninterrupted 6-step run (checkpoint at step 3), the run resumed from that checkpoint,
    the trained model and the checkpoint directory."""
    runs = {}
    for mode in ("plain", "layerwise"):
        out = tmp_path_factory.mktemp(f"galore-{mode}")
        trainer_cls = MemftTrainer if mode == "layerwise" else Trainer
        model = load_model()
        optimizer = galore(model, mode == "layerwise")
        args = make_args(out, save_strategy="steps", save_steps=3)
        _, full = fit(trainer_cls, model, args, rows, tokenizer, (optimizer, linear_decay(optimizer, 6)))
        resumed_model = load_model()
        optimizer = galore(resumed_model, mode == "layerwise")
        _, resumed = fit(trainer_cls, resumed_model, args, rows, tokenizer, (optimizer, linear_decay(optimizer, 6)),
                         resume=str(out / "checkpoint-3"))
        runs[mode] = {"full": full.losses(), "resumed": resumed.losses(), "model": model,
                      "checkpoint": out / "checkpoint-3"}
    return runs


@pytest.mark.parametrize("mode", ["plain", "layerwise"])
def test_galore_trains_and_resumes_with_identical_losses(galore_runs, probe, mode):
    run = galore_runs[mode]
    batch, before = probe
    assert len(run["full"]) == 6 and len(run["resumed"]) == 3
    assert probe_loss(run["model"], batch) < 0.8 * before
    assert run["resumed"] == run["full"][3:]
    state = torch.load(run["checkpoint"] / "optimizer.pt", weights_only=True)
    assert any("projector" in entry for entry in state["state"].values())


def test_layerwise_galore_in_trainer_matches_the_ordinary_optimizer(galore_runs):
    """set_micro_batch follows the Trainer's accumulation windows: with the full gradient on refresh steps the
    layer-wise optimizer takes the ordinary optimizer's steps (both unclipped)."""
    torch.testing.assert_close(torch.tensor(galore_runs["layerwise"]["full"]),
                               torch.tensor(galore_runs["plain"]["full"]), rtol=1e-5, atol=1e-6)


def test_layerwise_galore_from_a_spec_matches_plain_galore(tmp_path, rows, tokenizer):
    """The builders' layer-wise plan (step kind in_backward) runs in MemftTrainer and, without accumulation or
    clipping, takes the ordinary GaLore steps."""
    losses = {}
    for layerwise in (False, True):
        spec = {"optimizer": {"name": "galore_adamw", "lr": 3e-3, "rank": 4, "update_proj_gap": 2,
                              "layerwise": layerwise}, "train": {"lr_schedule": "linear", "max_grad_norm": None}}
        model = load_model()
        optimizer, scheduler = memft_optimizer(model, spec, num_training_steps=3)
        assert optimizer_step_kind(optimizer) == ("in_backward" if layerwise else "backprop")
        _, recorder = fit(MemftTrainer, model, make_args(tmp_path / str(layerwise), max_steps=3,
                                                         gradient_accumulation_steps=1), rows, tokenizer,
                          (optimizer, scheduler))
        losses[layerwise] = recorder.losses()
    assert len(losses[True]) == 3
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=1e-6)


def test_the_8b_recipes_composition_trains_and_resumes_in_the_trainer(tmp_path, rows, tokenizer):
    """recipes/llama3-8b-24gb.yaml's optimizer and loss (8-bit GaLore stepped in backward, LM head low-rank,
    randomized refreshes, clipping, cut cross-entropy) as a spec: MemftTrainer trains the tiny model with it and a
    run resumed from its checkpoint repeats the uninterrupted run's losses."""
    from memft.recipe_files import RECIPES_DIR
    from memft.train.recipe import load_recipe_data

    recipe = load_recipe_data(RECIPES_DIR / "llama3-8b-24gb.yaml")
    optimizer_section = {**recipe["optimizer"], "rank": 4, "update_proj_gap": 2, "lr": 3e-3}
    spec = {"optimizer": optimizer_section, "loss": recipe["loss"],
            "train": {"max_grad_norm": recipe["train"]["max_grad_norm"], "lr_schedule": "constant"}}
    runs = []
    for resume in (None, str(tmp_path / "full" / "checkpoint-2")):
        model, _ = apply_memft(load_model(), spec)
        optimizer, scheduler = memft_optimizer(model, spec, num_training_steps=4)
        args = make_args(tmp_path / "full", max_steps=4, max_grad_norm=recipe["train"]["max_grad_norm"],
                         save_strategy="steps", save_steps=2)
        _, recorder = fit(MemftTrainer, model, args, rows, tokenizer, (optimizer, scheduler), resume=resume)
        runs.append(recorder.losses())
    full, resumed = runs
    assert len(full) == 4 and full[-1] < full[0]
    assert resumed == full[2:]


def test_layerwise_clipping_must_agree_with_the_trainer(tmp_path, rows, tokenizer):
    model = load_model()
    optimizer = LayerwiseOptimizer(galore_param_groups(model, rank=4), GaLoreAdamW, lr=1e-3)
    trainer = MemftTrainer(model=model, args=make_args(tmp_path, max_grad_norm=1.0), train_dataset=rows,
                           optimizers=(optimizer, None))
    with pytest.raises(ValueError, match="max_grad_norm=1.0"):
        trainer.create_optimizer()


def test_layerwise_grad_norm_is_the_optimizers_clipping_norm(tmp_path, rows, tokenizer):
    model = load_model()
    optimizer = LayerwiseOptimizer(galore_param_groups(model, rank=4), GaLoreAdamW, lr=3e-3, max_grad_norm=0.5)

    class NormAfterStep(TrainerCallback):
        def __init__(self):
            self.norms: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.norms.append(float(optimizer.last_grad_norm))

    probe = NormAfterStep()
    _, recorder = fit(MemftTrainer, model, make_args(tmp_path, max_steps=3, max_grad_norm=0.5), rows, tokenizer,
                      (optimizer, None), callbacks=[probe])
    logged = [entry["grad_norm"] for entry in recorder.logs if "loss" in entry]
    assert logged == pytest.approx(probe.norms) and len(logged) == 3
    assert min(logged) > 0.5  # the tiny model's gradients exceed 0.5: clipping was active


# -------------------------------------------------------------------------------------------------- MeZO
MEZO_SPEC = {"optimizer": {"name": "mezo", "lr": 2e-3, "eps": 1e-3}, "train": {"lr_schedule": "linear"}}


def test_mezo_takes_one_step_per_accumulation_window(tmp_path, rows, tokenizer):
    """Each window of 2 micro-batches is one MeZO step on the window's mean token loss (one z for the whole
    window): the Trainer's parameters and logged losses equal direct MeZO.step calls on the same batches."""
    seen: list[dict] = []

    def recording_collator(examples):
        seen.append(collate(examples, tokenizer.pad_token_id))
        return seen[-1]

    model = load_model()
    optimizer, scheduler = memft_optimizer(model, MEZO_SPEC, num_training_steps=2)
    assert optimizer_step_kind(optimizer) == "zeroth_order"
    trainer = MemftTrainer(model=model, args=make_args(tmp_path, max_steps=2), train_dataset=rows,
                           optimizers=(optimizer, scheduler), data_collator=recording_collator,
                           callbacks=[recorder := LogRecorder()])
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, ForwardOnlyStep) and optimizer.steps_taken == 2

    reference = load_model().eval()
    mezo, schedule = memft_optimizer(reference, MEZO_SPEC, num_training_steps=2)
    losses = []
    for window in (seen[0:2], seen[2:4]):  # the loader reads one batch ahead: seen[4] was never trained on
        items = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in window)
        losses.append(float(mezo.step(lambda: sum(reference(**b, num_items_in_batch=items).loss for b in window))))
        schedule.step()
    for trained, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(trained, expected, rtol=1e-6, atol=1e-7)
    assert recorder.losses() == pytest.approx(losses, rel=1e-6)
    assert all("grad_norm" not in entry for entry in recorder.logs)


def test_mezo_trains_and_resumes_with_identical_losses(tmp_path, rows, tokenizer, probe):
    args = make_args(tmp_path, save_strategy="steps", save_steps=3)
    model = load_model()
    _, full = fit(MemftTrainer, model, args, rows, tokenizer, memft_optimizer(model, MEZO_SPEC, 6))
    batch, before = probe
    assert probe_loss(model, batch) < 0.95 * before
    state = torch.load(tmp_path / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert state["mezo"]["steps_taken"] == 3
    model = load_model()
    _, resumed = fit(MemftTrainer, model, args, rows, tokenizer, memft_optimizer(model, MEZO_SPEC, 6),
                     resume=str(tmp_path / "checkpoint-3"))
    assert len(full.losses()) == 6 and resumed.losses() == full.losses()[3:]


def test_mezo_on_a_lora_adapter_moves_only_the_adapter(tmp_path, rows, tokenizer):
    """apply_memft's adapter section, then MeZO (the paper's LoRA setting): only trainable weights move."""
    spec = {"adapter": {"name": "lora", "r": 4}, "optimizer": {"name": "mezo", "lr": 1e-2, "eps": 1e-2}}
    model, _ = apply_memft(load_model(), spec)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _, recorder = fit(MemftTrainer, model, make_args(tmp_path, max_steps=2), rows, tokenizer,
                      memft_optimizer(model, spec, 2))
    assert len(recorder.losses()) == 2
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert moved == trainable and all("lora_" in name for name in moved)


def test_zeroth_order_step_outside_memft_trainer_is_refused():
    parameter = torch.nn.Parameter(torch.zeros(3))
    wrapped = ForwardOnlyStep(MeZO([parameter], lr=0.1))
    with pytest.raises(RuntimeError, match="MemftTrainer"):
        wrapped.step()
    wrapped.run(lambda: (parameter - 1.0).square().sum())
    assert wrapped.step() is None  # the Trainer's step() right after a step is a no-op
    assert not torch.equal(parameter.detach(), torch.zeros(3))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_layerwise_in_a_plain_trainer_names_the_mixin(tmp_path, rows, tokenizer, grad_accum):
    """Without the mixin nothing announces the micro-batches: the first backward says what to use instead of
    logging grad_norm 0 (one micro-batch) or failing later (accumulation)."""
    model = load_model()
    spec = {"optimizer": {"name": "galore_adamw", "rank": 4, "layerwise": True}, "train": {"max_grad_norm": None}}
    optimizer, scheduler = memft_optimizer(model, spec, 2)
    with pytest.raises(RuntimeError, match=r"MemftTrainerMixin"):
        fit(Trainer, model, make_args(tmp_path, max_steps=2, gradient_accumulation_steps=grad_accum), rows, tokenizer,
            (optimizer, scheduler))


def test_mezo_in_a_plain_trainer_names_the_mixin(tmp_path, rows, tokenizer):
    model = load_model()
    optimizer, scheduler = memft_optimizer(model, MEZO_SPEC, 2)
    with pytest.raises(TypeError, match=r"MemftTrainerMixin"):
        fit(Trainer, model, make_args(tmp_path, max_steps=2), rows, tokenizer, (optimizer, scheduler))


# --------------------------------------------------------------------------- loss patch and activations
@pytest.fixture(scope="module")
def baseline_losses(tmp_path_factory, rows, tokenizer):
    """The Trainer's own AdamW on the unmodified model, 4 steps."""
    _, recorder = fit(Trainer, load_model(), make_args(tmp_path_factory.mktemp("baseline"), max_steps=4), rows,
                      tokenizer)
    return recorder.losses()


def test_cut_cross_entropy_trains_like_the_full_logits_loss(tmp_path, rows, tokenizer, probe, baseline_losses):
    batch, before = probe
    model, handle = apply_memft(load_model(), {"loss": {"name": "cut_cross_entropy"}})
    with torch.no_grad():
        assert model(**batch).logits is None  # the patched forward never builds the logits
    _, recorder = fit(Trainer, model, make_args(tmp_path, max_steps=4), rows, tokenizer)
    torch.testing.assert_close(torch.tensor(recorder.losses()), torch.tensor(baseline_losses), rtol=1e-4, atol=1e-5)
    assert probe_loss(model, batch) < 0.8 * before
    handle.undo()
    with torch.no_grad():
        assert model(**batch).logits is not None


def test_activation_compressor_trains(tmp_path, rows, tokenizer, probe, baseline_losses):
    batch, before = probe
    model, handle = apply_memft(load_model(), {"activations": {"name": "mesa"}})
    assert any("forward" in vars(module) for module in model.modules())  # compressed modules are patched
    _, recorder = fit(Trainer, model, make_args(tmp_path, max_steps=4), rows, tokenizer)
    losses = recorder.losses()
    assert losses[0] == pytest.approx(baseline_losses[0], rel=1e-6)  # forward outputs are exact
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(baseline_losses), rtol=0.05, atol=0.0)
    handle.undo()
    assert not any("forward" in vars(module) for module in model.modules())
    assert probe_loss(model, batch) < 0.8 * before


# ------------------------------------------------------------------------------------------------ memory
def test_memory_figures_reach_reporting_callbacks(tmp_path, rows, tokenizer):
    """MemftCallback on a plain Trainer, the recorder placed before it (so nothing can be added to a log dict
    after the recorder saw it); the Trainer's own memory metrics stay on and its loss logs are kept."""
    model = load_model()
    optimizer, scheduler = memft_optimizer(model, {"optimizer": {"name": "adamw", "lr": 3e-3}}, 4)
    recorder = LogRecorder()
    args = make_args(tmp_path, max_steps=4, logging_steps=2, gradient_accumulation_steps=1,
                     skip_memory_metrics=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows, optimizers=(optimizer, scheduler),
                      data_collator=lambda examples: collate(examples, tokenizer.pad_token_id), callbacks=[recorder])
    trainer.add_callback(MemftCallback(trainer, track_steps=2))
    trainer.train()

    assert [entry["step"] for entry in recorder.logs if "loss" in entry] == [2, 4]
    memory = [entry for entry in recorder.logs if any(key.startswith("memory/") for key in entry)]
    assert [entry["step"] for entry in memory] == [2, 4]
    first, last = memory
    breakdown = {c: first[f"memory/tracked_peak_{c}_bytes"] for c in CATEGORIES}
    assert sum(breakdown.values()) == first["memory/tracked_peak_bytes"] > 0
    parameters = list(model.parameters())  # the tied embedding / LM head weight is listed once
    parameter_bytes = sum(p.numel() * p.element_size() for p in parameters)
    assert breakdown["parameters"] == parameter_bytes
    assert breakdown["activations"] > 0
    assert "memory/run_tracked_peak_bytes" not in first
    assert "memory/tracked_peak_bytes" not in last  # steps 3-4 were not tracked
    assert last["memory/tracked_steps"] == 2
    assert last["memory/run_tracked_peak_bytes"] == first["memory/tracked_peak_bytes"]
    # AdamW: two moments per parameter and a 4-byte fp32 step counter per tensor
    assert last["memory/run_tracked_peak_optimizer_state_bytes"] == 2 * parameter_bytes + 4 * len(parameters)
    assert not any("cuda" in key for entry in memory for key in entry)  # CPU run
    assert any("train_mem_cpu_alloc_delta" in entry for entry in recorder.logs)


def test_memft_trainer_attaches_its_memory_callback(tmp_path, rows, tokenizer):
    """MeZO built by the Trainer itself (optimizer_cls_and_kwargs, the Trainer's own schedule), tracked."""
    callback = MemftCallback(track_steps=1)
    trainer, recorder = fit(MemftTrainer, load_model(), make_args(tmp_path, max_steps=2), rows, tokenizer,
                            callbacks=[callback], optimizer_cls_and_kwargs=memft_optimizer_cls_and_kwargs(MEZO_SPEC))
    assert optimizer_step_kind(trainer.optimizer) == "zeroth_order" and len(recorder.losses()) == 2
    final = [entry for entry in recorder.logs if "memory/run_tracked_peak_bytes" in entry]
    assert len(final) == 1 and final[0]["memory/tracked_steps"] == 1
    assert final[0]["memory/run_tracked_peak_gradients_bytes"] == 0  # forward-only steps hold no gradient
    assert final[0]["memory/run_tracked_peak_activations_bytes"] == 0  # and save nothing for backward
    report = callback.report()
    assert report.peak_bytes == final[0]["memory/run_tracked_peak_bytes"]


@pytest.mark.parametrize("trainer_memory_metrics", [False, True])
def test_cuda_peaks_per_logging_interval_and_for_the_run(monkeypatch, trainer_memory_metrics):
    """Interval peaks restart at every logging step and the run peak is their maximum, each on the Trainer's loss
    line of its step; under the Trainer's own memory metrics the peak statistics are never reset and only the run
    peak is reported."""
    allocator = FakeAllocator()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("max_memory_allocated", "max_memory_reserved", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, getattr(allocator, name))

    class LoggingTrainer:
        def __init__(self):
            self.logs = []

        def log(self, logs):
            self.logs.append(dict(logs))

    trainer = LoggingTrainer()
    callback = MemftCallback(trainer, track_steps=0)
    args = SimpleNamespace(device=torch.device("cuda"), skip_memory_metrics=not trainer_memory_metrics)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control)
    for step, nbytes in enumerate([500, 300, 200], start=1):
        callback.on_step_begin(args, state, control)
        allocator.allocate(nbytes)
        control.should_log, control.should_training_stop = True, step == 3
        callback.on_step_end(args, state, control)
        assert control.should_log  # kept for the Trainer's own loss log
        trainer.log({"loss": float(step)})
    callback.on_train_end(args, state, control)
    assert [entry["loss"] for entry in trainer.logs] == [1.0, 2.0, 3.0]  # no line of their own
    if trainer_memory_metrics:
        assert allocator.resets == 0
        assert trainer.logs[-1] == {"loss": 3.0, "memory/run_cuda_peak_allocated_bytes": 500,
                                    "memory/run_cuda_peak_reserved_bytes": 1012}
    else:
        assert [entry["memory/cuda_peak_allocated_bytes"] for entry in trainer.logs] == [500, 300, 200]
        assert [entry["memory/cuda_peak_reserved_bytes"] for entry in trainer.logs] == [1012, 812, 712]
        assert trainer.logs[-1]["memory/run_cuda_peak_allocated_bytes"] == 500
        assert trainer.logs[-1]["memory/run_cuda_peak_reserved_bytes"] == 1012


def test_memory_callback_needs_a_trainer(tmp_path, rows):
    trainer = Trainer(model=load_model(), args=make_args(tmp_path, max_steps=1), train_dataset=rows,
                      callbacks=[MemftCallback()])
    with pytest.raises(ValueError, match="MemftCallback needs the trainer"):
        trainer.train()


# --------------------------------------------------------------------------------------- optimizer specs
def _adam_like_methods() -> list[str]:
    """Optimizer methods of the recipe schema that take betas and eps (new ones are covered as they arrive)."""
    sections = get_args(Recipe.model_fields["optimizer"].annotation)
    return [get_args(s.model_fields["name"].annotation)[0] for s in sections
            if {"betas", "eps", "weight_decay"} <= set(s.model_fields)]


@pytest.mark.parametrize("method", _adam_like_methods())
def test_optimizer_knobs_reach_the_param_groups(method):
    spec = {"optimizer": {"name": method, "lr": 1e-3, "weight_decay": 0.1, "betas": [0.8, 0.95], "eps": 1e-6}}
    model = load_model()
    optimizer, scheduler = memft_optimizer(model, spec, num_training_steps=10)
    groups = optimizer.param_groups
    assert all(tuple(g["betas"]) == (0.8, 0.95) and g["eps"] == 1e-6 for g in groups)
    decayed = [p for g in groups if g["weight_decay"] == 0.1 for p in g["params"]]
    assert decayed and all(p.ndim == 2 for p in decayed)
    assert all(g["weight_decay"] == 0.0 for g in groups for p in g["params"] if p.ndim < 2)
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3)


def test_optimizer_factory_builds_the_spec_inside_the_trainer(tmp_path, rows):
    spec = {"optimizer": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.1, "betas": [0.8, 0.95], "eps": 1e-6}}
    trainer = MemftTrainer(model=load_model(), args=make_args(tmp_path), train_dataset=rows,
                           optimizer_cls_and_kwargs=memft_optimizer_cls_and_kwargs(spec))
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer_step_kind(optimizer) == "backprop"
    assert all(g["lr"] == 2e-3 and tuple(g["betas"]) == (0.8, 0.95) and g["eps"] == 1e-6
               for g in optimizer.param_groups)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.1}


def test_bad_specs_are_refused_with_the_fix():
    model = load_model()
    with pytest.raises(ValueError, match="Did you mean 'cut_cross_entropy'"):
        apply_memft(model, {"loss": {"name": "cut_crossentropy"}})
    with pytest.raises(TypeError, match="spec must be a dict"):
        apply_memft(model, "cut_cross_entropy")
    with pytest.raises(ValueError, match="num_training_steps"):
        memft_optimizer(model, {"train": {"max_steps": 5}}, num_training_steps=10)
    with pytest.raises(ValueError, match="spec train.num_epochs: under a Trainer"):
        memft_optimizer(model, {"train": {"num_epochs": 2}}, num_training_steps=10)
    with pytest.raises(ValueError, match="positive int"):
        memft_optimizer(model, {}, num_training_steps=0)
