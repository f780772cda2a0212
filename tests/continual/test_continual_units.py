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
from memft.continual.mora import expert_relevance, expert_weights, extend_input_basis
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
    with pytest.raises(ValueError, match="input_subspace_energy"):
        MoRAOptions(input_subspace_energy=1.0)


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


def test_input_basis_extension_matches_hand_computation():
    # trace 10: e1 holds 0.6 of the energy, e1 + e2 0.9 >= 0.85 -> two directions
    basis = extend_input_basis(torch.zeros(4, 0), torch.diag(torch.tensor([6.0, 3.0, 1.0, 0.0])), energy=0.85)
    torch.testing.assert_close(basis.abs(), torch.eye(4)[:, :2])
    # a later task living on e3, e4 (5 + 5): nothing of it is captured yet, 8.5 needed -> both added
    basis = extend_input_basis(basis, torch.diag(torch.tensor([0.0, 0.0, 5.0, 5.0])), energy=0.85)
    assert basis.shape == (4, 4)
    torch.testing.assert_close(basis.t() @ basis, torch.eye(4), atol=1e-6, rtol=0)
    # a task already inside the basis adds nothing
    inside = extend_input_basis(basis[:, :2], torch.diag(torch.tensor([2.0, 1.0, 0.0, 0.0])), energy=0.85)
    assert inside.shape == (4, 2)


def test_input_orthogonal_keys_leave_old_inputs_untouched():
    """Task 0 sees inputs in a 3-dim subspace; task 1's experts (trained on inputs with components outside it)
    keep keys orthogonal to it, so with the test-time threshold old-subspace inputs get exactly the task-0
    output while other inputs change."""
    torch.manual_seed(0)
    options = MoRAOptions(r=3, top_k=4, tau=0.1, delta=0.05, input_subspace_energy=0.999)
    layer = MoRALinear(nn.Linear(8, 5), options)
    method = MoRA(options)
    method.model = nn.Sequential(layer)
    span = torch.linalg.qr(torch.randn(8, 3))[0]                     # [8, 3] orthonormal
    old_inputs = torch.randn(64, 3) @ span.t()
    method.begin_task(0)
    with torch.no_grad():
        layer.B.copy_(torch.randn(5, 3))
    layer.train()
    layer(old_inputs)                                                # accumulates the input covariance
    method.end_task(0)
    assert layer.input_basis.shape == (8, 3)
    torch.testing.assert_close(layer.input_basis @ layer.input_basis.t(), span @ span.t(), atol=1e-5, rtol=0)
    layer.eval()
    layer.test_threshold = True
    new_inputs = torch.randn(64, 8)
    with torch.no_grad():
        before, before_new = layer(old_inputs), layer(new_inputs)
    method.begin_task(1)
    torch.testing.assert_close(layer.A @ span, torch.zeros(3, 3), atol=1e-6, rtol=0)   # initialised orthogonal
    optimizer = torch.optim.SGD([layer.A, layer.B], lr=0.05)
    layer.train()
    layer.test_threshold = False
    for _ in range(5):
        loss = (layer(new_inputs) - 1.0).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        method.after_step()                                          # keys projected back
    torch.testing.assert_close(layer.A.detach() @ span, torch.zeros(3, 3), atol=1e-6, rtol=0)
    layer.eval()
    layer.test_threshold = True
    with torch.no_grad():
        torch.testing.assert_close(layer(old_inputs), before, atol=1e-5, rtol=1e-5)
        assert (layer(new_inputs) - before_new).abs().max() > 1e-2       # the new experts did learn
    assert method.parameter_bytes()["input_basis"] == 8 * 3 * 4


def test_mora_state_with_input_basis_round_trips(micro_llama):
    options = MoRAOptions(r=2, top_k=2, target_modules=["q_proj", "down_proj"], input_subspace_energy=0.9)
    method = MoRA(options)
    model = method.attach(micro_llama())
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    method.begin_task(0)
    model.train()
    model(input_ids=ids)                       # accumulates the input covariance of task 0
    method.end_task(0)
    method.begin_task(1)
    blob = io.BytesIO()
    torch.save(method.state_dict(), blob)
    blob.seek(0)
    copy = MoRA(options)
    copy.attach(micro_llama(seed=1))
    copy.begin_task(0)
    copy.begin_task(1)
    copy.load_state_dict(torch.load(blob, weights_only=True))
    for (_, a), (_, b) in zip(method.layers(), copy.layers()):
        assert a.input_basis.shape[1] > 0 and torch.equal(a.input_basis, b.input_basis)
        assert torch.equal(a.A, b.A) and torch.equal(a.frozen_B, b.frozen_B)


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
