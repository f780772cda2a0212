"""MemoryTracker: byte-exact accounting against hand-derived counts on CPU."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memft.memory import CATEGORIES, MemoryTracker, track

F32 = 4


def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _expected(**nonzero: int) -> dict[str, int]:
    return {c: nonzero.get(c, 0) for c in CATEGORIES}


def test_linear_adamw_two_steps_exact():
    """One Linear (no bias), AdamW for-loop, 2 steps. Peak is inside step(): params P, grads P,
    moments 2P, the 4-byte fp32 `step` tensor, and the two P-sized temporaries of
    `(exp_avg_sq.sqrt() / bias_correction2_sqrt)`; the input x is pre-existing `other`."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3, foreach=False)
    x = torch.randn(2, 64)
    P, X = _nbytes(lin), x.numel() * F32
    with MemoryTracker(lin, opt) as mt:
        for _ in range(2):
            loss = lin(x).pow(2).sum()
            loss.backward()
            del loss
            opt.step()
            after_step = mt.current_breakdown()
            opt.zero_grad(set_to_none=True)
        end = mt.current_breakdown()
    assert after_step == _expected(parameters=P, gradients=P, optimizer_state=2 * P + 4, other=X)
    assert end == _expected(parameters=P, optimizer_state=2 * P + 4, other=X)
    assert mt.run_peak_bytes == 6 * P + 4 + X
    assert mt.run_peak_breakdown == _expected(
        parameters=P, gradients=P, optimizer_state=2 * P + 4, temporaries=2 * P, other=X
    )
    assert sum(mt.run_peak_breakdown.values()) == mt.run_peak_bytes


def test_linear_stack_state_after_two_steps():
    """Stack of Linear layers with biases: parameters + gradients + two fp32 moments + one fp32 step tensor
    per parameter tensor, to the byte."""
    net = nn.Sequential(nn.Linear(16, 48), nn.Linear(48, 40), nn.Linear(40, 8))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, foreach=False)
    x = torch.randn(5, 16)
    P, n_tensors = _nbytes(net), len(list(net.parameters()))
    with track(net, opt) as mt:
        for _ in range(2):
            net(x).square().mean().backward()
            opt.step()
            state = mt.current_breakdown()
            opt.zero_grad(set_to_none=True)
    assert state["parameters"] == P
    assert state["gradients"] == P
    assert state["optimizer_state"] == 2 * P + n_tensors * F32
    assert state["activations"] == 0 and state["temporaries"] == 0


def test_mlp_activations_exact_and_per_module():
    """Linear -> ReLU -> Linear, loss = y.pow(2).mean(). Saved for backward: x (pre-existing input,
    stays `other`), the ReLU output (B,H) and y (B,O) saved by pow. At backward start the loss and the
    scalar gradient seed backward() creates are still alive: they count as activations outside the model."""
    B, D, H, O = 8, 32, 64, 16
    net = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, O))
    x = torch.randn(B, D)
    with MemoryTracker(net, track_modules=True) as mt:
        y = net(x)
        loss = y.pow(2).mean()
        after_forward = mt.current_breakdown()
        loss.backward()
        per_module = mt.module_activation_bytes()
    assert after_forward == _expected(
        parameters=_nbytes(net), activations=(B * H + B * O) * F32, temporaries=F32, other=B * D * F32
    )
    assert per_module == {"1": B * H * F32, "2": B * O * F32, "<outside>": 2 * F32}
    assert mt.module_activation_bytes(depth=1) == per_module


def test_checkpoint_boundaries_are_activations():
    """Two checkpointed blocks: nothing inside a block is kept, only the boundary (block 1 output, held by
    block 2's checkpoint) and the output/loss/seed; without checkpointing each block keeps its ReLU output
    and block 2 also keeps its input."""
    B, D = 4, 32
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D)) for _ in range(2))
    x = torch.randn(B, D)
    act = B * D * F32

    def run(use_checkpoint: bool) -> int:
        with MemoryTracker(blocks, track_modules=True) as mt:
            h = x
            for block in blocks:
                h = checkpoint(block, h, use_reentrant=False) if use_checkpoint else block(h)
            loss = h.sum()
            loss.backward()
        return sum(mt.module_activations.values())  # activation bytes alive when backward started

    assert run(True) == act + act + 2 * F32  # boundary, output, loss + seed
    assert run(False) == 2 * act + act + act + 2 * F32  # two ReLU outputs, boundary, output, loss + seed


def test_views_share_storage_and_frees_are_counted():
    with MemoryTracker() as mt:
        base = torch.empty(1000)
        views = [base[10:], base.view(10, 100), base[::2]]
        assert mt.current_bytes == 1000 * F32
        del base
        assert mt.current_bytes == 1000 * F32  # views keep the storage alive
        del views
        assert mt.current_bytes == 0
    assert mt.peak_bytes == 1000 * F32


def test_peak_reset_and_run_peak():
    with MemoryTracker() as mt:
        a = torch.empty(1000)
        b = torch.empty(500)
        del a
        c = torch.empty(200)
        assert mt.peak_bytes == 1500 * F32
        mt.reset_peak()
        assert mt.peak_bytes == 700 * F32
        d = torch.empty(100)
        assert mt.peak_bytes == 800 * F32
        del b, c, d
    assert mt.run_peak_bytes == 1500 * F32
    assert mt.interval_peaks == [1500 * F32]
    report = mt.summary()
    assert report.interval_peak_bytes == [1500 * F32, 800 * F32]
    assert report.peak_bytes == 1500 * F32
    assert mt.current_bytes == 0


def test_cuda_peaks_none_on_cpu():
    with MemoryTracker(device="cpu") as mt:
        torch.empty(10)
    assert mt.cuda_peaks() is None


def test_grads_found_without_model_argument():
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with track() as mt:
        lin(x).sum().backward()
        state = mt.current_breakdown()
    assert state["parameters"] == _nbytes(lin)
    assert state["gradients"] == _nbytes(lin)
    assert state["other"] == x.numel() * F32


def test_optimizer_state_of_untracked_optimizer_is_found():
    lin = nn.Linear(8, 4)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    with track(lin) as mt:
        lin(torch.randn(2, 8)).sum().backward()
        opt.step()
        assert mt.current_breakdown()["optimizer_state"] == _nbytes(lin)  # momentum buffers


def test_register_and_tagging():
    cache = torch.empty(64)
    with MemoryTracker() as mt:
        mt.register(cache, "optimizer_state")
        with mt.tagging("other"):
            batch = torch.empty(32)
        tmp = torch.empty(16)
        state = mt.current_breakdown()
        del batch, tmp
    assert state == _expected(optimizer_state=64 * F32, other=32 * F32, temporaries=16 * F32)


def test_device_filter_counts_only_that_device():
    with MemoryTracker(device="meta") as mt:
        torch.empty(100)
        keep = torch.empty(100, device="meta")
        assert mt.current_bytes == 100 * F32
        del keep


def test_reentry_rebuilds_and_nesting_is_refused():
    lin = nn.Linear(4, 4)
    mt = MemoryTracker(lin)
    with mt:
        with pytest.raises(RuntimeError, match="already active"):
            mt.__enter__()
    with mt:
        assert mt.current_bytes == _nbytes(lin)
    assert mt.run_peak_bytes == _nbytes(lin)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        MemoryTracker(model="not a module")
    with pytest.raises(ValueError, match="track_modules"):
        MemoryTracker(track_modules=True)
    with pytest.raises(ValueError, match="granularity"):
        MemoryTracker(granularity=0)
    with pytest.raises(ValueError, match="category"):
        MemoryTracker().tagging("weights").__enter__()


def test_cuda_granularity_rounds_each_storage():
    with MemoryTracker(device="cpu", granularity=512) as mt:
        small = torch.empty(3)  # 12 bytes -> one 512-byte block
        big = torch.empty(200)  # 800 bytes -> two blocks
        assert mt.current_bytes == 512 + 1024
        del small, big
