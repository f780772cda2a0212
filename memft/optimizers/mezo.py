"""MeZO: memory-efficient zeroth-order SGD (Malladi et al., arXiv 2305.17333).

One step estimates the gradient from two forward passes (SPSA) and never calls backward:

    s  ~ the optimizer's seed generator                 (one step seed per estimate)
    z  ~ N(0, I), regenerated from s whenever needed    (never stored)
    l+ = closure() with every trainable θ replaced by θ + ε·z
    l- = closure() with every trainable θ replaced by θ − ε·z
    g  = (l+ − l-) / (2ε)                               (0-dim tensor, at least fp32)
    θ ← θ − lr·(g·z + wd·θ)

n-SPSA (``n_samples = n > 1``) draws n step seeds s_1..s_n, evaluates g_k for each, and applies one update
with the mean estimate, weight decay counted once:

    θ ← θ·(1 − lr·wd) − Σ_k (lr·g_k / n)·z_k

The returned loss is the mean of the 2n objective values (a 0-dim tensor, or a float when every value the
closure returned was a Python number).

Exactness. θ is never written to for the perturbation (the reference adds +εz, −2εz, +εz in place, which does
not restore fp16/bf16 weights, MeZO issue #42). While the closure runs, a ``TorchFunctionMode`` replaces each
trainable parameter, at the moment an op receives it, by a fresh tensor θ ± ε·z computed in the parameter's
dtype as ``torch.add(θ, z.to(θ.dtype), alpha=±ε)`` with z drawn in fp32. The perturbed tensor lives only as long
as the op that uses it (or a view that op returns, e.g. ``weight.T``), never a copy of the model. z is drawn
once per use and once for the update (three draws per parameter per estimate; the reference draws four). The
replacement happens per use, not per module, so parameters read outside their owner's forward
(``nn.MultiheadAttention.out_proj``, a parent reading a child's weight, a loss reading ``lm_head.weight``) and
tied weights (one parameter used by two modules: same index, so the same z in both uses) are all perturbed.
With ``lr = 0`` a group is left untouched, so parameters stay bitwise equal in every dtype.

The update mutates θ (the real update): per range of the flattened θ, in fp32 (fp64 for fp64 parameters),
``acc = θ·(1 − lr·wd); acc −= (lr·g_k/n)·z_k for each k; θ = acc rounded to θ.dtype``, where z_k is the fp32
draw cast to θ.dtype and back (the direction the forward passes actually used).

Scratch. A step holds at most ``scratch_bytes`` beyond what inference holds, its 0-dim objective values aside
(default: 1 % of the bytes of the parameters in ``param_groups`` or 64 MiB, whichever is larger), so training
memory is inference memory:

- z is written straight into the tensor that needs it. On CPU it is drawn in fp32 pieces of about scratch/32
  values: torch's CPU ``normal_`` turns blocks of 16 uniforms into 16 normals and redraws a tail's last 16, so
  pieces of 16·k values (a chunk's last piece: at least 16) continue one draw of the chunk exactly. On CUDA a
  whole chunk is drawn at a time, directly in the parameter's dtype for fp16, bf16 and fp32 (the kernel computes
  each value in fp32 and rounds it once, as the cast of an fp32 draw does); elsewhere a whole fp32 chunk, cast.
- A parameter whose perturbed copy (with its draw) exceeds the budget is applied a block of rows at a time when
  an op is ``F.linear`` or ``F.embedding`` with it as a contiguous 2-D weight: only one block of θ + ε·z
  (rows × columns) exists at once.
- The update runs over ranges of the flattened θ with one fp32 accumulator (θ itself for fp32 and fp64 θ) and one
  buffer of z in the accumulator's dtype, both reused.

z's values, and so results, do not depend on the budget, with one exception: a linear layer applied by row
blocks computes its output features with GEMMs over fewer features, which may round differently from one GEMM
(kernels choose their blocking by shape); the same budget and shapes give the same blocks, so runs and resumes
stay bitwise equal. Beyond the budget: on CUDA a held chunk is ``min(numel, 2^24)`` values per estimate
(32 MiB in bf16), so a budget below ``n_samples`` such chunks is exceeded by the difference; a perturbed tensor
that an op returns a view of lives as long as that view; a parameter above the budget read by any other op is
built whole; a non-contiguous parameter is updated through one contiguous copy.

Random directions. Step seeds are ``torch.randint(0, 2**63 - 1, ())`` draws from a CPU ``torch.Generator`` owned
by the optimizer and seeded with ``seed``. z of parameter number ``i`` (position in ``param_groups``, group by
group, frozen parameters counted) is generated in chunks of ``CHUNK_NUMEL`` elements of the flattened
parameter; chunk ``c`` is ``torch.empty(n, dtype=float32).normal_(generator=G)`` with ``G`` a generator on the
parameter's device seeded with ``perturbation_seed(s, i, c)``. z therefore depends neither on other
parameters' sizes nor on the order in which the model uses them. Only parameters with ``requires_grad`` are
perturbed and updated (so PEFT adapters work unchanged); ``requires_grad`` is read at every step.

Closure contract. ``closure()`` takes no argument and returns a scalar objective (tensor with one element or a
Python number; any objective, e.g. negative accuracy). It runs under ``torch.no_grad``. It must be
deterministic given the parameters: put the model in eval mode (dropout would draw different masks for l+ and
l-). Gradient accumulation: the closure averages over all micro-batches of the step, so every micro-batch sees
the same z. Each ``param_group`` may set its own ``eps``; its estimate is then (l+ − l-)/(2·eps_group), which is
unbiased for that group.

``state_dict()`` adds ``mezo``: ``steps_taken`` and the seed generator state (uint8 tensor); it round-trips through
``torch.load(weights_only=True)`` and a resumed run continues the same trajectory bitwise. Under
``FakeTensorMode`` a step runs on fake tensors (step seeds are drawn with the fake mode suspended; z for fake
tensors comes from a CPU generator). Data parallel: give every rank the same ``seed`` and all-reduce the objective
inside the closure, so all ranks apply the same update.

Limits: a kernel that reads a parameter's storage directly (``data_ptr`` in a custom extension not registered
through ``torch.library``) sees the unperturbed θ; closures that run ``torch.compile``d code are not tested.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily
from torch.nn import functional as F
from torch.optim import Optimizer
from torch.overrides import TorchFunctionMode

__all__ = ["CHUNK_NUMEL", "MIN_SCRATCH_BYTES", "MeZO", "perturbation_seed"]

CHUNK_NUMEL = 1 << 24
"""Elements of z drawn per generator seeding: fixes z's values, whatever the scratch budget (CPU draws a chunk in
pieces that continue one draw). On CUDA one chunk is drawn per kernel launch, so it is large enough that a GPU
step is not bound by launches (2^20 made a 0.87B-parameter bf16 step 20 % slower on an H200)."""

MIN_SCRATCH_BYTES = 64 << 20
"""Smallest default scratch budget of a step (the default is 1 % of the parameters' bytes, at least this)."""

_MASK64 = (1 << 64) - 1
_SEED_HIGH = (1 << 63) - 1
_NORMAL_BLOCK = 16  # torch's CPU normal_ turns 16 uniforms into 16 normals and redraws a tail's last 16
_CUDA_DIRECT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Tensor methods answered from metadata or identity: the parameter itself is the right answer.
_METADATA_METHODS = frozenset(
    {
        Tensor.size,
        Tensor.dim,
        Tensor.numel,
        Tensor.stride,
        Tensor.storage_offset,
        Tensor.is_contiguous,
        Tensor.element_size,
        Tensor.data_ptr,
        Tensor.untyped_storage,
        Tensor.__len__,
    }
)
# Attribute getters whose value depends on the parameter's values (all other getters are metadata).
_VALUE_GETTERS = frozenset({"T", "mT", "H", "mH", "data", "real", "imag"})
_LINEAR_ARGS = ("input", "weight", "bias")
_EMBEDDING_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def perturbation_seed(step_seed: int, param_index: int, chunk_index: int) -> int:
    """Seed (63 bits) of chunk ``chunk_index`` of z for parameter ``param_index`` under step seed ``step_seed``."""
    mixed = _splitmix64(step_seed & _MASK64)
    mixed = _splitmix64(mixed ^ param_index)
    mixed = _splitmix64(mixed ^ chunk_index)
    return mixed >> 1


def _may_stop(position: int, numel: int) -> bool:
    """Whether a read of z (flattened, ``numel`` values) may stop at ``position``: at a chunk start, at the end, or a
    multiple of 16 values into a chunk and at least 16 before its end (where CPU draws in pieces stay exact)."""
    offset = position % CHUNK_NUMEL
    chunk_end = min(position - offset + CHUNK_NUMEL, numel)
    return offset == 0 or position == numel or (offset % _NORMAL_BLOCK == 0 and chunk_end - position >= _NORMAL_BLOCK)


def _cuts(numel: int, unit: int, step: int) -> list[int]:
    """Boundaries ``0 = b_0 < … < b_m = numel // unit`` in units of ``unit`` values, at most ``step`` apart where z
    may stop there (see ``_may_stop``), else the nearest stop beyond."""
    total = numel // unit
    cuts = [0]
    while cuts[-1] < total:
        low = cuts[-1]
        target = min(low + max(step, 1), total)
        stop = next((u for u in range(target, low, -1) if _may_stop(u * unit, numel)), None)
        if stop is None:
            stop = next(u for u in range(target + 1, total + 1) if _may_stop(u * unit, numel))
        cuts.append(stop)
    return cuts


def _draws_in_pieces(like: Tensor) -> bool:
    """Whether z for ``like``'s device is drawn in pieces (CPU) rather than a whole chunk at a time."""
    return like.device.type == "cpu"


def _draw_dtype(like: Tensor) -> torch.dtype:
    """The dtype z is drawn in on ``like``'s device (see the module docstring)."""
    return like.dtype if like.device.type == "cuda" and like.dtype in _CUDA_DIRECT_DTYPES else torch.float32


def _draw_scratch(param: Tensor, piece: int, streams: int) -> int:
    """Bytes at most held by ``streams`` concurrent z streams of ``param`` while they draw (see ``_Stream``)."""
    numel = min(param.numel(), CHUNK_NUMEL)
    if _draws_in_pieces(param):
        return 4 * min(piece + _NORMAL_BLOCK - 1, numel)  # one fp32 piece at a time, whatever the stream
    cast = 0 if _draw_dtype(param) == param.dtype else 4
    return streams * numel * (param.element_size() + cast)


class _Stream:
    """z of one parameter under one step seed, rounded to the parameter's dtype, read front to back.

    Reads must stop where ``_may_stop`` allows. On CPU z is drawn in fp32 pieces of at most ``piece`` (+15) values;
    elsewhere a whole chunk is drawn (and held while reads cover part of it)."""

    def __init__(self, generator: torch.Generator, param: Tensor, step_seed: int, index: int, piece: int) -> None:
        self._generator = generator
        self._param = param
        self._step_seed = step_seed
        self._index = index
        self._piece = piece
        self._position = 0
        self._held: tuple[int, Tensor] | None = None

    def fill(self, out: Tensor) -> None:
        """Write the next ``out.numel()`` values of z, rounded to the parameter's dtype, into ``out`` (1-D,
        contiguous; the parameter's dtype, or fp32/fp64 holding the rounded values exactly)."""
        count, done, numel, dtype = out.numel(), 0, self._param.numel(), self._param.dtype
        while done < count:
            chunk_index, offset = divmod(self._position, CHUNK_NUMEL)
            chunk_numel = min(CHUNK_NUMEL, numel - self._position + offset)
            if _draws_in_pieces(out):
                take = min(count - done, chunk_numel - offset, self._piece)
                if chunk_numel - offset - take < _NORMAL_BLOCK:
                    take = chunk_numel - offset  # a chunk's tail is drawn with its last full piece
                if offset == 0:
                    self._seed(chunk_index)
                target = out[done : done + take]
                if out.dtype == torch.float32:
                    target.normal_(generator=self._generator)
                    if dtype.itemsize < 4:
                        target.copy_(target.to(dtype))  # rounded as the forward passes used it
                else:
                    drawn = torch.empty(take, dtype=torch.float32, device=out.device)
                    target.copy_(drawn.normal_(generator=self._generator))
                    del drawn  # freed before the next piece is drawn
            else:
                take = min(count - done, chunk_numel - offset)
                target = out[done : done + take]
                if take == chunk_numel and out.dtype == dtype == _draw_dtype(self._param):
                    self._seed(chunk_index)
                    target.normal_(generator=self._generator)
                else:
                    target.copy_(self._chunk(chunk_index, chunk_numel)[offset : offset + take])
            done += take
            self._position += take

    def _seed(self, chunk_index: int) -> None:
        self._generator.manual_seed(perturbation_seed(self._step_seed, self._index, chunk_index))

    def _chunk(self, chunk_index: int, chunk_numel: int) -> Tensor:
        if self._held is None or self._held[0] != chunk_index:
            self._held = None  # freed before the next chunk is drawn
            self._seed(chunk_index)
            dtype = _draw_dtype(self._param)
            drawn = torch.empty(chunk_numel, dtype=dtype, device=self._param.device).normal_(generator=self._generator)
            self._held = (chunk_index, drawn.to(self._param.dtype))
        return self._held[1]


class _Directions:
    """Streams of z from per-device generators reseeded with ``perturbation_seed`` (fake tensors: CPU)."""

    def __init__(self) -> None:
        self._generators: dict[tuple[torch.device, int], torch.Generator] = {}

    def stream(self, param: Tensor, step_seed: int, param_index: int, piece: int, slot: int = 0) -> _Stream:
        """z of ``param`` (number ``param_index``); streams read at the same time need different ``slot``s."""
        device = torch.device("cpu") if is_fake(param) or param.device.type == "meta" else param.device
        generator = self._generators.get((device, slot))
        if generator is None:
            generator = self._generators[(device, slot)] = torch.Generator(device=device)
        return _Stream(generator, param, step_seed, param_index, piece)


@dataclass(frozen=True)
class _Trainable:
    param: Tensor
    index: int
    group: dict[str, Any]


class _PerturbedParameters(TorchFunctionMode):
    """While active, every op that receives a trainable parameter θ receives θ + sign·ε·z instead.

    θ is never written; the perturbed tensor (θ's shape and dtype) is rebuilt at each use from the step seed,
    so two uses of one parameter (tied weights, several micro-batches) see bitwise the same values. An op whose
    perturbed parameters would exceed ``scratch`` bytes runs by row blocks where it is ``F.linear`` or
    ``F.embedding`` of a contiguous 2-D weight."""

    def __init__(
        self, directions: _Directions, trainables: list[_Trainable], step_seed: int, sign: float, scratch: int,
        piece: int,
    ) -> None:
        super().__init__()
        self._directions = directions
        self._by_id = {id(t.param): t for t in trainables}
        self._step_seed = step_seed
        self._sign = sign
        self._scratch = scratch
        self._piece = piece

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not (self._holds_target(args) or (kwargs and self._holds_target(kwargs.values()))):
            return func(*args, **kwargs)  # the common case: no trainable parameter among the arguments
        if func in _METADATA_METHODS or (
            getattr(func, "__name__", None) == "__get__"
            and getattr(getattr(func, "__self__", None), "__name__", None) not in _VALUE_GETTERS
        ):
            return func(*args, **kwargs)
        if func is F.linear or func is F.embedding:
            names = _LINEAR_ARGS if func is F.linear else _EMBEDDING_ARGS
            named = {**dict(zip(names, args)), **kwargs}
            weight = self._target(named.get("weight"))
            if weight is not None and self._by_rows(func, named, weight):
                if func is F.linear:
                    return self._linear_by_rows(named["input"], weight, named.get("bias"))
                return self._embedding_by_rows(named["input"], weight)
        args = tuple(self._swap(value) for value in args)
        kwargs = {key: self._swap(value) for key, value in kwargs.items()}
        return func(*args, **kwargs)

    def _holds_target(self, values: Iterable[Any]) -> bool:
        """Whether a trainable parameter is among ``values`` or one level down in a list or tuple."""
        by_id = self._by_id
        for value in values:
            if id(value) in by_id:
                return True
            if type(value) in (list, tuple) and any(id(item) in by_id for item in value):
                return True
        return False

    def _target(self, value: Any) -> _Trainable | None:
        trainable = self._by_id.get(id(value))
        return trainable if trainable is not None and trainable.param is value else None

    def _swap(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            trainable = self._target(value)
            return value if trainable is None else self._perturbed(trainable)
        if isinstance(value, (list, tuple)) and any(isinstance(item, Tensor) for item in value):
            return type(value)(self._swap(item) for item in value)
        return value

    def _room(self, param: Tensor) -> int:
        """Bytes left for perturbed tensors and op temporaries while ``param``'s z is drawn."""
        return self._scratch - _draw_scratch(param, self._piece, 1)

    def _by_rows(self, func: Callable, named: dict[str, Any], weight: _Trainable) -> bool:
        """Whether ``func`` runs by row blocks: its perturbed parameters exceed the budget and it can."""
        param, data = weight.param, named.get("input")
        if param.dim() != 2 or not param.is_contiguous() or self._target(data) is not None:
            return False
        if func is F.embedding and named.get("max_norm") is not None:
            return False  # max_norm renormalises the rows it reads in place
        bias = self._target(named.get("bias"))
        whole = _nbytes(param) + (0 if bias is None else _nbytes(bias.param))
        return whole > self._room(param)

    def _perturbed(self, trainable: _Trainable) -> Tensor:
        """θ + sign·ε·z, contiguous, in θ's dtype: z is written into the result, then θ added in place."""
        param = trainable.param
        perturbed = torch.empty(param.shape, dtype=param.dtype, device=param.device)
        stream = self._directions.stream(param, self._step_seed, trainable.index, self._piece)
        stream.fill(perturbed.view(-1))
        return torch.add(param, perturbed, alpha=self._sign * trainable.group["eps"], out=perturbed)

    def _row_blocks(self, trainable: _Trainable, free: int, row_bytes: int) -> Iterator[tuple[int, int, Tensor]]:
        """(first row, end row, θ + sign·ε·z of those rows) of a 2-D trainable, in blocks of at most
        ``free // row_bytes`` rows (more only where z cannot stop), built in one reused buffer."""
        param = trainable.param
        width = param.shape[1]
        cuts = _cuts(param.numel(), width, free // row_bytes)
        longest = max(stop - start for start, stop in zip(cuts, cuts[1:]))
        buffer = torch.empty(longest * width, dtype=param.dtype, device=param.device)
        stream = self._directions.stream(param, self._step_seed, trainable.index, self._piece)
        alpha = self._sign * trainable.group["eps"]
        for start, stop in zip(cuts, cuts[1:]):
            block = buffer[: (stop - start) * width]
            stream.fill(block)
            block = block.view(stop - start, width)
            yield start, stop, torch.add(param[start:stop], block, alpha=alpha, out=block)

    def _linear_by_rows(self, data: Tensor, weight: _Trainable, bias: Tensor | None) -> Tensor:
        """``F.linear(data, θ + εz, bias)`` computed a block of output features at a time."""
        param = weight.param
        bias_target = self._target(bias)
        if bias_target is not None:
            bias = self._perturbed(bias_target)
        fixed = 0 if bias_target is None else _nbytes(bias)
        tokens = data.numel() // param.shape[1]
        row_bytes = param.shape[1] * param.element_size() + tokens * max(data.element_size(), param.element_size())
        if torch.is_autocast_enabled(data.device.type):
            row_bytes += 2 * param.shape[1]  # autocast's 16-bit copy of the block
        output = None
        for start, stop, block in self._row_blocks(weight, self._room(param) - fixed, row_bytes):
            part = F.linear(data, block, None if bias is None else bias[start:stop])
            if output is None:
                output = torch.empty(*part.shape[:-1], param.shape[0], dtype=part.dtype, device=part.device)
            output[..., start:stop] = part
            del part
        return output

    def _embedding_by_rows(self, indices: Tensor, weight: _Trainable) -> Tensor:
        """``F.embedding(indices, θ + εz)`` gathered from a block of rows at a time."""
        param = weight.param
        rows, width = param.shape
        checkable = not is_fake(indices) and indices.device.type != "meta" and indices.numel() > 0
        if checkable and not bool(((indices >= 0) & (indices < rows)).all()):
            raise IndexError("index out of range in self")  # F.embedding's error; a block would leave the row unset
        output = torch.empty(*indices.shape, width, dtype=param.dtype, device=param.device)
        fixed = indices.numel() * (width * param.element_size() + 3 * indices.element_size() + 3)
        for start, stop, block in self._row_blocks(weight, self._room(param) - fixed, width * param.element_size()):
            local = indices - start
            inside = (local >= 0) & (local < stop - start)
            gathered = F.embedding(local.clamp_(0, stop - start - 1), block)
            torch.where(inside.unsqueeze(-1), gathered, output, out=output)
            del local, inside, gathered
        return output


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class MeZO(Optimizer):
    """Zeroth-order SGD with seed-replayed Gaussian perturbations (MeZO, arXiv 2305.17333).

    Args:
        params: parameters or parameter groups; only those with ``requires_grad`` are perturbed and updated.
        lr: learning rate (typical: 1e-6 to 1e-7 full fine-tuning, 1e-4 to 5e-5 LoRA).
        eps: perturbation scale ε (typical: 1e-3 full, 1e-2 LoRA, 1e-1 prefix); may differ per group.
        weight_decay: decoupled decay wd in θ ← θ − lr·(g·z + wd·θ).
        n_samples: n of n-SPSA; the update uses the mean of n estimates (2n closure calls per step).
        seed: seed of the generator that draws the step seeds.
        scratch_bytes: bytes a step may hold beyond inference (default None: 1 % of the bytes of the parameters in
            ``param_groups``, at least ``MIN_SCRATCH_BYTES``); z's values do not depend on it.

    ``step(closure)`` returns the mean objective; see the module docstring for the exact update and contracts.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        n_samples: int = 1,
        seed: int = 0,
        scratch_bytes: int | None = None,
    ) -> None:
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(
                f"MeZO: n_samples must be an integer >= 1 (got {n_samples!r}); it is the number of SPSA "
                "estimates averaged per step (1 for plain MeZO)."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"MeZO: seed must be an int (got {type(seed).__name__}); pass e.g. seed=0.")
        if scratch_bytes is not None and (
            isinstance(scratch_bytes, bool) or not isinstance(scratch_bytes, int) or scratch_bytes < 1
        ):
            raise ValueError(
                f"MeZO: scratch_bytes must be a positive int or None (got {scratch_bytes!r}); None picks 1 % of "
                "the parameters' bytes, at least 64 MiB."
            )
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})
        self.n_samples = n_samples
        self.scratch_bytes = scratch_bytes
        self.steps_taken = 0
        self._seed_generator = torch.Generator(device="cpu")
        self._seed_generator.manual_seed(seed)
        self._directions = _Directions()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its lr, eps, weight_decay and parameters (see ``torch.optim.Optimizer``)."""
        for name, strict in (("lr", False), ("eps", True), ("weight_decay", False)):
            value = param_group.get(name, self.defaults[name])
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"MeZO: {name} must be a float (got {type(value).__name__}); pass e.g. {name}=1e-3.")
            if value < 0 or (strict and value == 0):
                bound = "> 0" if strict else ">= 0"
                raise ValueError(f"MeZO: {name} must be {bound} (got {value!r}); pick a {bound} value.")
        super().add_param_group(param_group)
        for param in self.param_groups[-1]["params"]:
            if not param.is_floating_point():
                self.param_groups.pop()
                raise TypeError(
                    f"MeZO: parameters must be real floating-point tensors (got dtype {param.dtype}); leave "
                    "integer or complex tensors out of the optimizer."
                )

    def scratch(self) -> int:
        """The step's scratch budget in bytes: ``scratch_bytes``, or 1 % of the parameters' bytes (>= 64 MiB)."""
        if self.scratch_bytes is not None:
            return self.scratch_bytes
        total = sum(_nbytes(param) for group in self.param_groups for param in group["params"])
        return max(total // 100, MIN_SCRATCH_BYTES)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor | float]) -> Tensor | float:  # type: ignore[override]
        """Run 2·n_samples perturbed evaluations of ``closure`` and update the trainable parameters."""
        if not callable(closure):
            raise TypeError(
                "MeZO.step needs a closure: a function with no arguments returning the scalar objective "
                "(e.g. lambda: model(**batch).loss); MeZO evaluates it at θ + εz and θ − εz. A "
                "transformers.Trainer (or TRL trainer) steps without one: train with "
                "memft.integrations.MemftTrainer, or mix MemftTrainerMixin into your trainer class "
                "(class MySFTTrainer(MemftTrainerMixin, SFTTrainer)), which runs MeZO's forward-only step."
            )
        trainables = self._trainables()
        scratch = self.scratch()
        piece = max(_NORMAL_BLOCK, scratch // 32 // _NORMAL_BLOCK * _NORMAL_BLOCK)  # CPU draws: 1/8 of the budget
        values: list[Tensor | float] = []
        estimates: list[tuple[int, Tensor]] = []
        for _ in range(self.n_samples):
            step_seed = self._draw_seed()
            plus = self._evaluate(closure, trainables, step_seed, 1.0, scratch, piece)
            minus = self._evaluate(closure, trainables, step_seed, -1.0, scratch, piece)
            values += [plus, minus]
            estimates.append((step_seed, _as_scalar_tensor(plus) - _as_scalar_tensor(minus)))
        self._update(trainables, estimates, scratch, piece)
        self.steps_taken += 1
        if all(isinstance(value, (int, float)) for value in values):
            return sum(values) / len(values)  # type: ignore[arg-type]
        return torch.stack([_as_scalar_tensor(value) for value in values]).mean()

    def state_dict(self) -> dict[str, Any]:
        """Torch optimizer state plus ``mezo``: steps taken and the seed generator state (uint8 tensor)."""
        state = super().state_dict()
        state["mezo"] = {"steps_taken": self.steps_taken, "seed_generator_state": self._seed_generator.get_state()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; the next step continues the saved trajectory exactly."""
        mezo_state = state_dict.get("mezo")
        if not isinstance(mezo_state, dict) or not {"steps_taken", "seed_generator_state"} <= mezo_state.keys():
            raise ValueError(
                "MeZO.load_state_dict: the state has no 'mezo' entry with 'steps_taken' and "
                "'seed_generator_state'; pass a dict produced by MeZO.state_dict()."
            )
        generator_state = mezo_state["seed_generator_state"]
        if not isinstance(generator_state, Tensor) or generator_state.dtype != torch.uint8:
            raise TypeError(
                "MeZO.load_state_dict: 'seed_generator_state' must be a uint8 tensor as returned by "
                "torch.Generator.get_state(); load the checkpoint without converting its tensors."
            )
        super().load_state_dict({key: value for key, value in state_dict.items() if key != "mezo"})
        self._seed_generator.set_state(generator_state.cpu())
        self.steps_taken = int(mezo_state["steps_taken"])

    def _trainables(self) -> list[_Trainable]:
        trainables, seen = [], set()
        index = 0
        for group in self.param_groups:
            for param in group["params"]:
                if param.requires_grad and id(param) not in seen:
                    trainables.append(_Trainable(param, index, group))
                seen.add(id(param))
                index += 1
        return trainables

    def _draw_seed(self) -> int:
        with unset_fake_temporarily():
            return int(torch.randint(0, _SEED_HIGH, (), generator=self._seed_generator).item())

    def _evaluate(
        self, closure: Callable[[], Tensor | float], trainables: list[_Trainable], step_seed: int, sign: float,
        scratch: int, piece: int,
    ) -> Tensor | float:
        with _PerturbedParameters(self._directions, trainables, step_seed, sign, scratch, piece):
            value = closure()
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"MeZO: the closure returned a tensor of shape {tuple(value.shape)}; it must return a scalar "
                    "objective (reduce it, e.g. loss.mean())."
                )
            return value.detach()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"MeZO: the closure returned {type(value).__name__}; it must return a scalar tensor or a Python "
                "number."
            )
        return value

    def _update(
        self, trainables: list[_Trainable], estimates: list[tuple[int, Tensor]], scratch: int, piece: int
    ) -> None:
        """θ ← θ·(1 − lr·wd) − Σ_k (lr·g_k/n)·z_k with g_k = (l+ − l-)_k / (2·eps_group)."""
        coefficients_by_group: dict[tuple[int, torch.device], list[tuple[int, Tensor]]] = {}
        for trainable in trainables:
            group, param = trainable.group, trainable.param
            if group["lr"] == 0 or param.numel() == 0:
                continue
            key = (id(group), param.device)
            if key not in coefficients_by_group:  # lr·g_k/n per group and device
                coefficients_by_group[key] = [
                    (seed, (difference / (2 * group["eps"]) * (group["lr"] / self.n_samples)).to(param.device))
                    for seed, difference in estimates
                ]
            self._update_parameter(trainable, coefficients_by_group[key], scratch, piece)

    def _update_parameter(
        self, trainable: _Trainable, coefficients: list[tuple[int, Tensor]], scratch: int, piece: int
    ) -> None:
        """One parameter's update by ranges of the flattened θ that fit ``scratch`` with one accumulator (fp32, or θ
        itself for fp32/fp64 θ) and one buffer of z in the accumulator's dtype, both reused; they die on return."""
        group, param = trainable.group, trainable.param
        accumulate_dtype = torch.promote_types(param.dtype, torch.float32)
        in_place = param.dtype == accumulate_dtype
        flat = param.view(-1) if param.is_contiguous() else param.reshape(-1)
        streams = [
            self._directions.stream(param, seed, trainable.index, piece, slot)
            for slot, (seed, _) in enumerate(coefficients)
        ]
        per_value = accumulate_dtype.itemsize * (1 if in_place else 2)
        cuts = _cuts(param.numel(), 1, (scratch - _draw_scratch(param, piece, len(streams))) // per_value)
        longest = max(stop - start for start, stop in zip(cuts, cuts[1:]))
        directions = torch.empty(longest, dtype=accumulate_dtype, device=param.device)
        accumulator = None if in_place else torch.empty(longest, dtype=accumulate_dtype, device=param.device)
        for start, stop in zip(cuts, cuts[1:]):
            chunk = flat[start:stop]
            acc = chunk if accumulator is None else accumulator[: stop - start].copy_(chunk)
            if group["weight_decay"] != 0:
                acc.mul_(1 - group["lr"] * group["weight_decay"])
            z = directions[: stop - start]
            for stream, (_, coefficient) in zip(streams, coefficients):
                stream.fill(z)
                acc.addcmul_(z, coefficient, value=-1)
            if acc is not chunk:
                chunk.copy_(acc)
        if not param.is_contiguous():
            param.copy_(flat.view(param.shape))


def _as_scalar_tensor(value: Tensor | float) -> Tensor:
    """The objective as a 0-dim tensor of at least fp32 precision (Python numbers become fp32)."""
    if isinstance(value, Tensor):
        return value.reshape(()).to(torch.promote_types(value.dtype, torch.float32))
    return torch.tensor(value, dtype=torch.float32)
