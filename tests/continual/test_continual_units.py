"""Unit checks of the building blocks against independent hand computations: I-LoRA's interpolation and
replay buffer, MoRA's expert selection and layer, TIES merging and WISE routing, and fake-tensor runs."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from memft.continual import ILoRA, ILoRAOptions, MoRA, MoRALinear, MoRAOptions, ReplayBuffer, ties_merge
from memft.continual.mora import expert_relevance, expert_weights
from memft.continual.wise import SideMemory
from memft.train.data import collate


# ------------------------------------------------------------------------------------------- I-LoRA
def test_ilora_interpolation_is_exact(micro_llama):
    method = ILoRA(ILoRAOptions(r=4, alpha=8, target_modules=["q_proj", "v_proj"], ema_lambda=0.7))
    method.attach(micro_llama())
    pairs = method._pairs()
    assert len(pairs) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    for fast, slow in pairs:
        assert torch.equal(fast, slow)  # the slow learner starts as a copy
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for fast, slow in pairs:
            fast.copy_(torch.randn(fast.shape, generator=gen))
            slow.copy_(torch.randn(slow.shape, generator=gen))
    before = [(f.detach().double().clone(), s.detach().double().clone()) for f, s in pairs]
    for _ in range(3):
        method.after_step()
    for (fast, slow), (f0, s0) in zip(pairs, before):
        # three steps with a fixed fast learner: slow = l^3 s0 + (1 - l^3) f0
        expected = 0.7 ** 3 * s0 + (1 - 0.7 ** 3) * f0
        torch.testing.assert_close(slow.double(), expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(fast.double(), f0)


def test_replay_buffer_keeps_minus_100_padding():
    examples = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]},
                {"input_ids": [5, 6, 3], "labels": [-100, -100, 3]},
                {"input_ids": [4, 4, 4, 4, 4, 4, 2], "labels": [-100] * 6 + [2]}]
    buffer = ReplayBuffer(capacity=10)
    buffer.add_batch(collate(examples, pad_id=0))
    assert buffer.examples == examples  # stored unpadded, prompt labels kept at -100
    batch = buffer.sample(3, pad_id=0)
    padding = batch["attention_mask"] == 0
    assert padding.any()
    assert (batch["labels"][padding] == -100).all()
    stored = {tuple(ex["input_ids"]) for ex in examples}
    for row, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        assert tuple(row[:n].tolist()) in stored and labels[:n].ne(-100).sum() >= 1


def test_reservoir_keeps_each_example_with_equal_probability():
    capacity, stream, trials = 4, 12, 3000
    counts = [0] * stream
    for trial in range(trials):
        buffer = ReplayBuffer(capacity, seed=trial)
        for i in range(stream):
            buffer.add({"input_ids": [i], "labels": [i]})
        for ex in buffer.examples:
            counts[ex["input_ids"][0]] += 1
    p = capacity / stream
    sigma = math.sqrt(p * (1 - p) / trials)
    assert max(abs(c / trials - p) for c in counts) < 4.5 * sigma


def test_replay_buffer_state_round_trip():
    buffer = ReplayBuffer(3, seed=5)
    for i in range(7):
        buffer.add({"input_ids": [i, i + 1], "labels": [-100, i + 1]})
    blob = io.BytesIO()
    torch.save(buffer.state_dict(), blob)
    blob.seek(0)
    copy = ReplayBuffer(1)
    copy.load_state_dict(torch.load(blob, weights_only=True))
    assert copy.examples == buffer.examples and copy.seen == 7
    assert torch.equal(copy.sample(2, 0)["input_ids"], buffer.sample(2, 0)["input_ids"])  # same RNG state


def test_options_are_validated():
    with pytest.raises(ValueError, match="ema_lambda"):
        ILoRAOptions(ema_lambda=1.0)
    with pytest.raises(ValueError, match="tau"):
        MoRAOptions(tau=0)
    with pytest.raises(ValueError, match="relevance"):
        MoRAOptions(relevance="softmax")


# --------------------------------------------------------------------------------------------- MoRA
def test_top_k_and_threshold_masks():
    s = torch.tensor([[0.9, 0.5, 0.3, 0.1, -0.2]])
    w = expert_weights(s, top_k=3, tau=0.1, delta=None)
    expected = torch.zeros(1, 5)
    expected[0, :3] = torch.softmax(torch.tensor([9.0, 5.0, 3.0]), 0)
    torch.testing.assert_close(w, expected)
    w = expert_weights(s, top_k=3, tau=0.1, delta=0.4)  # delta drops 0.3 although it is in the top 3
    expected = torch.zeros(1, 5)
    expected[0, :2] = torch.softmax(torch.tensor([9.0, 5.0]), 0)
    torch.testing.assert_close(w, expected)
    s = torch.tensor([[0.1, -0.3, 0.05]], requires_grad=True)
    w = expert_weights(s, top_k=2, tau=0.02, delta=0.2)  # nothing reaches delta: all experts off
    assert torch.equal(w, torch.zeros(1, 3))
    (w.sum() + s.sum()).backward()
    assert torch.isfinite(s.grad).all()


def test_relevance_normalisations():
    x = torch.tensor([[1.0, 2.0, 2.0]])
    keys = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 4.0]])
    h = x @ keys.T                                   # [1, 14]
    torch.testing.assert_close(expert_relevance(h, x, keys, "l2"), h / math.sqrt(1 + 196))
    torch.testing.assert_close(expert_relevance(h, x, keys, "cosine"), torch.tensor([[1 / 3, 14 / 15]]))


def test_mora_layer_matches_the_formula_and_folds_the_scale():
    torch.manual_seed(0)
    options = MoRAOptions(r=3, top_k=4, tau=0.5, delta=0.1, alpha=6.0)
    base = nn.Linear(5, 4)
    layer = MoRALinear(base, options)
    gen = torch.Generator().manual_seed(0)
    layer.add_experts(gen)
    with torch.no_grad():
        layer.B.copy_(torch.randn(4, 3))
    a_old, b_old = layer.A.detach().clone(), layer.B.detach().clone()
    layer.add_experts(gen)                    # freezes task 0's experts
    assert torch.equal(layer.frozen_A, a_old)
    assert torch.equal(layer.frozen_B, b_old * 2.0)  # alpha / r = 2 folded into B
    with torch.no_grad():
        layer.B.copy_(torch.randn(4, 3))
    x = torch.randn(7, 5)
    keys = torch.cat([layer.frozen_A, layer.A]).detach()
    values = torch.cat([layer.frozen_B, layer.B.detach() * 2.0], dim=1)
    for threshold in (False, True):
        layer.test_threshold = threshold
        out = layer(x)
        for i in range(7):
            h = keys @ x[i]
            s = h / h.norm()
            kept = [j for j in s.topk(4).indices.tolist() if not threshold or s[j] >= 0.1]
            w = torch.softmax(s[kept] / 0.5, 0)
            expected = base(x[i]) + sum(w[n] * h[j] * values[:, j] for n, j in enumerate(kept))
            torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-6)


def test_mora_trains_under_fake_tensors(micro_llama):
    with FakeTensorMode():
        model = micro_llama()
        method = MoRA(MoRAOptions(r=2, top_k=2, target_modules=["q_proj", "down_proj"]))
        method.attach(model)
        method.begin_task(0)
        ids = torch.randint(0, 64, (2, 6))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.shape == p.shape for p in method.trainable_parameters())
        with method.evaluating() as eval_model:
            assert eval_model(input_ids=ids).logits.shape == (2, 6, 64)


# --------------------------------------------------------------------------------------- TIES, WISE
def test_ties_merge_of_two_shards_matches_hand_computation():
    base = torch.ones(2, 3)
    d1 = torch.tensor([[3.0, -1.0, 0.5], [2.0, -4.0, 0.1]])
    d2 = torch.tensor([[-2.0, -3.0, 0.2], [1.0, 5.0, -0.3]])
    # trim to 3 of 6 entries: d1 -> [[3,0,0],[2,-4,0]], d2 -> [[-2,-3,0],[0,5,0]]
    # elected signs from the sum [[1,-3,0],[2,1,0]]: [[+,-,+],[+,+,+]]; disjoint mean of agreeing entries
    merged = ties_merge(base, [base + d1, base + d2], density=0.5)
    torch.testing.assert_close(merged, base + torch.tensor([[3.0, -3.0, 0.0], [2.0, 5.0, 0.0]]))
    # weights 2 : 1 -> sum [[4,-3,0],[4,-3,0]]: signs [[+,-,+],[+,-,+]]; -4 now agrees, 5 does not
    merged = ties_merge(base, [base + d1, base + d2], weights=[2.0, 1.0], density=0.5)
    torch.testing.assert_close(merged, base + torch.tensor([[3.0, -3.0, 0.0], [2.0, -4.0, 0.0]]))


def test_side_memory_routes_each_row():
    torch.manual_seed(0)
    original = nn.Linear(4, 3, bias=True)
    memory = SideMemory(original)
    update = torch.zeros(3, 4)
    update[:, 0] = 1.0                       # the memory responds to feature 0 only
    memory.memories, memory.thresholds = [memory.base + update], [1.0]
    a = torch.tensor([[[2.0, 0.1, 0.0, 0.0]], [[0.0, 1.0, 1.0, 0.0]]])   # [B=2, S=1, 4]
    out = memory(a)
    # row 0: Delta = ||update a|| = 2 * sqrt(3) >= 1 -> memory; row 1: Delta = 0 -> original layer
    torch.testing.assert_close(out[0], nn.functional.linear(a[0], memory.base + update, original.bias))
    torch.testing.assert_close(out[1], original(a[1]))
    torch.testing.assert_close(memory.delta(a, memory.memories[0]), torch.tensor([2 * math.sqrt(3), 0.0]))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = mode.from_tensor(a)
        assert memory(fake).shape == (2, 1, 3)
