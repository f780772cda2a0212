"""Exact global clipping in LayerwiseOptimizer: the trajectory of torch AdamW + clip_grad_norm_, the step
finalised inside backward, and embeddings whose norm comes from their output gradient (watch_embeddings)."""

import io

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.checkpoint import checkpoint

from memft.optimizers import layerwise
from memft.optimizers.galore import GaLoreAdamW, GaLoreAdamW8bit
from memft.optimizers.layerwise import LayerwiseOptimizer, embedding_grad_norm
from tests.optimizers.test_layerwise import (
    FP32, VOCAB, _groups, _lr_lambda, _make_model, _micro_loss, _run_layerwise, reference_layerwise_adamw,
)  # fmt: skip
from tests.optimizers.tiny_model import TinyModel

ADAMW = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.01}
MAX_NORM = 0.5


class TiedModel(TinyModel):
    def __init__(self, vocab):
        super().__init__(vocab)
        self.lm_head.weight = self.embed.weight


class FunctionalUseModel(TinyModel):
    """Uses the embedding weight outside its module too: the output-gradient norm misses that part."""

    def forward(self, tokens):
        return super().forward(tokens) + 0.1 * self.embed.weight.sum(-1)


class TwiceCalledModel(TinyModel):
    def forward(self, tokens):
        h = self.embed(tokens) + self.embed(tokens.flip(-1))
        h = h + self.down_proj(torch.relu(self.up_proj(torch.tanh(self.q_proj(h)))))
        return self.lm_head(self.norm(h))


class CheckpointedEmbeddingModel(TinyModel):
    """Calls the embedding with a keyword, and again inside backward (non-reentrant checkpointing)."""

    def forward(self, tokens):
        h = checkpoint(lambda t: torch.tanh(self.embed(input=t)), tokens, use_reentrant=False)
        h = h + self.down_proj(torch.relu(self.up_proj(torch.tanh(self.q_proj(h)))))
        return self.lm_head(self.norm(h))


def _make(cls=TinyModel):
    torch.manual_seed(0)
    return cls(VOCAB)


def _run_reference_adamw(model, steps, total):
    """torch AdamW with clip_grad_norm_ on the summed .grad; yields (step, total norm before clipping)."""
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    sched = LambdaLR(opt, _lr_lambda)
    for step in range(steps):
        for index in range(total):
            _micro_loss(model, step, index, total).backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        sched.step()
        opt.zero_grad()
        yield step, norm


def _held_when_embedding_grad_exists(embedding, opt):
    """Held gradient bytes at each moment the embedding's full gradient exists (before its own hook)."""
    held = []
    embedding.weight.register_hook(lambda grad: held.append(opt.accumulated_gradient_bytes()))
    return held


@pytest.mark.parametrize("padding_idx, scale_grad_by_freq", [(None, False), (3, False), (None, True), (3, True)])
def test_embedding_grad_norm_equals_the_dense_gradient_norm(monkeypatch, padding_idx, scale_grad_by_freq):
    monkeypatch.setattr(layerwise, "EMBEDDING_CHUNK_NUMEL", 64)  # several column blocks
    torch.manual_seed(0)
    module = nn.Embedding(12, 20, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq)
    ids = torch.randint(0, 12, (3, 7))  # 21 ids, many repeated
    ids[0, :3] = 3
    out = module(ids)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    torch.testing.assert_close(embedding_grad_norm(module, ids, grad_out), module.weight.grad.norm(), **FP32)


@pytest.mark.parametrize("total", [1, 3])
def test_clipped_layerwise_equals_adamw_with_clip_grad_norm(total):
    model, twin = _make(), _make()
    opt = LayerwiseOptimizer(model, GaLoreAdamW, max_grad_norm=MAX_NORM, **ADAMW)  # watches model.embed
    sched = LambdaLR(opt, _lr_lambda)
    for step, (_, ref_norm) in zip(_run_layerwise(model, opt, sched, 5, total), _run_reference_adamw(twin, 5, total)):
        torch.testing.assert_close(opt.last_grad_norm, ref_norm, **FP32)
        assert ref_norm > MAX_NORM  # clipping was active
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, **FP32, msg=f"{name} after step {step}")


@pytest.mark.parametrize("total", [1, 2])
def test_clipped_galore_layerwise_with_watched_embedding_matches_reference(total):
    model, ref_model = _make_model(), _make_model()
    opt = LayerwiseOptimizer(_groups(model), GaLoreAdamW, max_grad_norm=MAX_NORM, lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
    opt.watch_embeddings(model)
    reference = reference_layerwise_adamw(ref_model, 5, total, "first", max_norm=MAX_NORM)
    for step, _ in zip(_run_layerwise(model, opt, LambdaLR(opt, _lr_lambda), 5, total), reference):
        assert opt.last_grad_norm > MAX_NORM
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, **FP32, msg=f"{name} after step {step}")


@pytest.mark.parametrize("watch", [True, False])
def test_watched_embedding_gradient_arrives_when_nothing_is_held(watch):
    model = _make_model()
    opt = LayerwiseOptimizer(_groups(model), GaLoreAdamW, max_grad_norm=MAX_NORM, lr=1e-2)
    if watch:
        opt.watch_embeddings(model)
    held = _held_when_embedding_grad_exists(model.embed, opt)
    for step in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        _micro_loss(model, step, 0, 1).backward()
        assert opt.accumulated_gradient_bytes() == 0  # every update happened inside backward: step() has nothing left
        assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
        opt.step()
    # Without a prediction (unwatched, or the first step, which checks it) all but the embedding are held: the fp32
    # LM head, norm and bias, and the rank-4 projections of q_proj (40x4), up_proj (72x4) and down_proj (4x72).
    plain = ("lm_head.weight", "norm.weight", "norm.bias", "q_proj.bias")
    plain_numel = sum(p.numel() for name, p in model.named_parameters() if name in plain)
    assert held[0] == 4 * (plain_numel + 4 * (40 + 72 + 72))
    assert held[1:] == ([0, 0] if watch else held[:1] * 2)


def test_bf16_low_rank_gradients_are_held_in_bf16_and_an_inactive_clip_changes_no_bit():
    results = []
    for max_grad_norm in (None, 1e9):
        model = _make_model().to(torch.bfloat16)
        opt = LayerwiseOptimizer(_groups(model), GaLoreAdamW8bit, max_grad_norm=max_grad_norm, lr=1e-2)
        held = _held_when_embedding_grad_exists(model.embed, opt)
        for step in range(3):
            _micro_loss(model, step, 0, 1).backward()
            opt.step()
        plain = ("lm_head.weight", "norm.weight", "norm.bias", "q_proj.bias")
        plain_numel = sum(p.numel() for name, p in model.named_parameters() if name in plain)
        assert held == ([2 * (plain_numel + 4 * (40 + 72 + 72))] * 3 if max_grad_norm else [0] * 3)
        results.append([p.detach().clone() for p in model.parameters()])
    for unclipped, clipped in zip(*results):
        assert torch.equal(unclipped, clipped)


@pytest.mark.parametrize("cls", [TiedModel, FunctionalUseModel, TwiceCalledModel])
def test_embedding_whose_weight_has_other_uses_falls_back_exactly(cls):
    model, twin = _make(cls), _make(cls)
    opt = LayerwiseOptimizer(model, GaLoreAdamW, max_grad_norm=MAX_NORM, **ADAMW)
    held = _held_when_embedding_grad_exists(model.embed, opt)
    sched = LambdaLR(opt, _lr_lambda)
    for step, (_, ref_norm) in zip(_run_layerwise(model, opt, sched, 3, 1), _run_reference_adamw(twin, 3, 1)):
        torch.testing.assert_close(opt.last_grad_norm, ref_norm, **FP32)
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, **FP32, msg=f"{name} after step {step}")
    assert len(held) == 3 and min(held) > 0
    assert opt._prediction_ok == ({model.embed.weight: False} if cls is FunctionalUseModel else {})


def test_embedding_recomputed_in_backward_is_counted_once():
    model, twin = _make(CheckpointedEmbeddingModel), _make(CheckpointedEmbeddingModel)
    opt = LayerwiseOptimizer(model, GaLoreAdamW, max_grad_norm=MAX_NORM, **ADAMW)
    held = _held_when_embedding_grad_exists(model.embed, opt)
    sched = LambdaLR(opt, _lr_lambda)
    for step, _ in zip(_run_layerwise(model, opt, sched, 3, 1), _run_reference_adamw(twin, 3, 1)):
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, **FP32, msg=f"{name} after step {step}")
    assert held[0] > 0 and held[1:] == [0, 0]


def _round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
@pytest.mark.parametrize("total", [1, 2])
def test_resume_with_watched_embedding_is_bitwise_the_uninterrupted_run(cls, total):
    """The resumed optimizer checks its first prediction again, and clips with the same norm meanwhile."""

    def build():
        model = _make_model()
        opt = LayerwiseOptimizer(_groups(model), cls, max_grad_norm=MAX_NORM, lr=1e-2)
        opt.watch_embeddings(model)
        return model, opt, LambdaLR(opt, _lr_lambda)

    model, opt, sched = build()
    norms = [opt.last_grad_norm.clone() for _ in _run_layerwise(model, opt, sched, 6, total)]
    first, first_opt, first_sched = build()
    for _ in _run_layerwise(first, first_opt, first_sched, 3, total):
        pass
    saved = _round_trip({"model": first.state_dict(), "opt": first_opt.state_dict(), "sched": first_sched.state_dict()})
    resumed, resumed_opt, resumed_sched = build()
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_sched.load_state_dict(saved["sched"])
    resumed_run = _run_layerwise(resumed, resumed_opt, resumed_sched, 3, total, start=3)
    resumed_norms = [resumed_opt.last_grad_norm.clone() for _ in resumed_run]
    assert all(torch.equal(a, b) for a, b in zip(norms[3:], resumed_norms))
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_watched_embeddings_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
        vocab_size=256, max_position_embeddings=64,
    )  # fmt: skip
    with FakeTensorMode():
        model = LlamaForCausalLM(config)
        opt = LayerwiseOptimizer(model, GaLoreAdamW8bit, max_grad_norm=1.0, lr=1e-3)
        held = _held_when_embedding_grad_exists(model.model.embed_tokens, opt)
        tokens = torch.randint(0, 256, (2, 16))
        for _ in range(2):
            model(input_ids=tokens, labels=tokens).loss.backward()
            assert opt.accumulated_gradient_bytes() == 0
            opt.step()
        assert held[0] > 0 and held[1] == 0  # fake gradients cannot be compared: the first check passes


def test_watch_embeddings_hooks_only_plain_clipped_embeddings_once():
    def forward_hooks(build):
        model = _make_model()
        opt = build(model)
        opt.watch_embeddings(model)
        opt.watch_embeddings(model)
        return len(model.embed._forward_hooks)

    def low_rank_embedding(model):
        rest = [p for name, p in model.named_parameters() if name != "embed.weight"]
        groups = [{"params": [model.embed.weight], "rank": 4}, {"params": rest}]
        return LayerwiseOptimizer(groups, GaLoreAdamW, max_grad_norm=MAX_NORM, lr=1e-2)  # consumes the projection

    def plain(max_grad_norm):
        return lambda model: LayerwiseOptimizer(model.parameters(), GaLoreAdamW, max_grad_norm=max_grad_norm, lr=1e-2)

    assert forward_hooks(plain(MAX_NORM)) == 1
    assert forward_hooks(plain(None)) == 0
    assert forward_hooks(low_rank_embedding) == 0


def test_estimate_is_the_measured_peak_and_watching_lowers_it_after_the_first_step():
    from memft.memory import hf_training_setup
    from memft.optimizers.galore import galore_param_groups

    def peaks(watch):
        def build_optimizer(model):
            opt = LayerwiseOptimizer(galore_param_groups(model, rank=8), GaLoreAdamW, max_grad_norm=1e-3, lr=1e-3)
            if watch:
                opt.watch_embeddings(model)
            return opt

        setup = hf_training_setup("tiny-llama", "float32", 1, 8, build_optimizer)  # LM head and embedding dominate
        estimated, measured = setup.estimate(device="cpu", steps=3), setup.measure(device="cpu", steps=3)
        assert estimated.interval_peak_bytes == measured.interval_peak_bytes
        return estimated.interval_peak_bytes

    held, watched = peaks(False), peaks(True)
    assert watched[0] == held[0]  # the first step checks the prediction, holding everything
    assert all(w < h for w, h in zip(watched[1:], held[1:]))
