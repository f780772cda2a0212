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
as the op that uses it (or a view that op returns, e.g. ``weight.T``), so the extra memory is about one parameter
plus one fp32 chunk of z, never a copy of the model: a step peaks where inference peaks. The price is time:
z is drawn once per use and once for the update (three draws per parameter per estimate; the reference draws
four). The replacement happens per use, not per module, so parameters read outside their owner's forward
(``nn.MultiheadAttention.out_proj``, a parent reading a child's weight, a loss reading ``lm_head.weight``) and
tied weights (one parameter used by two modules: same index, so the same z in both uses) are all perturbed.
With ``lr = 0`` a group is left untouched, so parameters stay bitwise equal in every dtype.

The update mutates θ (the real update): per chunk, in fp32 (fp64 for fp64 parameters),
``acc = θ·(1 − lr·wd); acc −= (lr·g_k/n)·z_k for each k; θ = acc rounded to θ.dtype``, where z_k is the fp32
draw cast to θ.dtype and back (the direction the forward passes actually used).

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
from torch.optim import Optimizer
from torch.overrides import TorchFunctionMode

__all__ = ["CHUNK_NUMEL", "MeZO", "perturbation_seed"]

CHUNK_NUMEL = 1 << 24
"""Elements of z drawn per generator seeding. Bounds the scratch beside a perturbed parameter to one fp32 chunk
of z (64 MiB) plus its cast, and the update's scratch to a few such chunks; large enough that a GPU step is not
bound by kernel launches (2^20 made a 0.87B-parameter bf16 step 20 % slower on an H200)."""

_MASK64 = (1 << 64) - 1
_SEED_HIGH = (1 << 63) - 1

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


def _chunks(numel: int) -> Iterator[tuple[int, int, int]]:
    """(chunk index, start, stop) over a flattened tensor of ``numel`` elements."""
    for chunk_index, start in enumerate(range(0, numel, CHUNK_NUMEL)):
        yield chunk_index, start, min(start + CHUNK_NUMEL, numel)


class _Directions:
    """Draws chunks of z from per-device generators reseeded with ``perturbation_seed`` (fake tensors: CPU)."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def chunk(self, like: Tensor, step_seed: int, param_index: int, chunk_index: int, numel: int) -> Tensor:
        """Chunk ``chunk_index`` of z for parameter ``param_index``: ``numel`` fp32 values on ``like``'s device."""
        device = torch.device("cpu") if is_fake(like) or like.device.type == "meta" else like.device
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        generator.manual_seed(perturbation_seed(step_seed, param_index, chunk_index))
        return torch.empty(numel, dtype=torch.float32, device=like.device).normal_(generator=generator)


@dataclass(frozen=True)
class _Trainable:
    param: Tensor
    index: int
    group: dict[str, Any]


class _PerturbedParameters(TorchFunctionMode):
    """While active, every op that receives a trainable parameter θ receives θ + sign·ε·z instead.

    θ is never written; the perturbed tensor (θ's shape and dtype) is rebuilt at each use from the step seed,
    so two uses of one parameter (tied weights, several micro-batches) see bitwise the same values.
    """

    def __init__(self, directions: _Directions, trainables: list[_Trainable], step_seed: int, sign: float) -> None:
        super().__init__()
        self._directions = directions
        self._by_id = {id(t.param): t for t in trainables}
        self._step_seed = step_seed
        self._sign = sign

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not (self._holds_target(args) or (kwargs and self._holds_target(kwargs.values()))):
            return func(*args, **kwargs)  # the common case: no trainable parameter among the arguments
        if func in _METADATA_METHODS or (
            getattr(func, "__name__", None) == "__get__"
            and getattr(getattr(func, "__self__", None), "__name__", None) not in _VALUE_GETTERS
        ):
            return func(*args, **kwargs)
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

    def _swap(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            trainable = self._by_id.get(id(value))
            return value if trainable is None or trainable.param is not value else self._perturbed(trainable)
        if isinstance(value, (list, tuple)) and any(isinstance(item, Tensor) for item in value):
            return type(value)(self._swap(item) for item in value)
        return value

    def _perturbed(self, trainable: _Trainable) -> Tensor:
        param = trainable.param
        alpha = self._sign * trainable.group["eps"]
        numel = param.numel()
        if numel <= CHUNK_NUMEL:
            z = self._directions.chunk(param, self._step_seed, trainable.index, 0, numel)
            return torch.add(param, z.view(param.shape).to(param.dtype), alpha=alpha)
        perturbed = torch.empty(param.shape, dtype=param.dtype, device=param.device)
        source, target = param.reshape(-1), perturbed.view(-1)
        for chunk_index, start, stop in _chunks(numel):
            z = self._directions.chunk(param, self._step_seed, trainable.index, chunk_index, stop - start)
            torch.add(source[start:stop], z.to(param.dtype), alpha=alpha, out=target[start:stop])
        return perturbed


class MeZO(Optimizer):
    """Zeroth-order SGD with seed-replayed Gaussian perturbations (MeZO, arXiv 2305.17333).

    Args:
        params: parameters or parameter groups; only those with ``requires_grad`` are perturbed and updated.
        lr: learning rate (typical: 1e-6 to 1e-7 full fine-tuning, 1e-4 to 5e-5 LoRA).
        eps: perturbation scale ε (typical: 1e-3 full, 1e-2 LoRA, 1e-1 prefix); may differ per group.
        weight_decay: decoupled decay wd in θ ← θ − lr·(g·z + wd·θ).
        n_samples: n of n-SPSA; the update uses the mean of n estimates (2n closure calls per step).
        seed: seed of the generator that draws the step seeds.

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
    ) -> None:
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(
                f"MeZO: n_samples must be an integer >= 1 (got {n_samples!r}); it is the number of SPSA "
                "estimates averaged per step (1 for plain MeZO)."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"MeZO: seed must be an int (got {type(seed).__name__}); pass e.g. seed=0.")
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})
        self.n_samples = n_samples
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
        values: list[Tensor | float] = []
        estimates: list[tuple[int, Tensor]] = []
        for _ in range(self.n_samples):
            step_seed = self._draw_seed()
            plus = self._evaluate(closure, trainables, step_seed, 1.0)
            minus = self._evaluate(closure, trainables, step_seed, -1.0)
            values += [plus, minus]
            estimates.append((step_seed, _as_scalar_tensor(plus) - _as_scalar_tensor(minus)))
        self._update(trainables, estimates)
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
        self, closure: Callable[[], Tensor | float], trainables: list[_Trainable], step_seed: int, sign: float
    ) -> Tensor | float:
        with _PerturbedParameters(self._directions, trainables, step_seed, sign):
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

    def _update(self, trainables: list[_Trainable], estimates: list[tuple[int, Tensor]]) -> None:
        """θ ← θ·(1 − lr·wd) − Σ_k (lr·g_k/n)·z_k with g_k = (l+ − l-)_k / (2·eps_group)."""
        coefficients_by_group: dict[tuple[int, torch.device], list[tuple[int, Tensor]]] = {}
        for trainable in trainables:
            group, param = trainable.group, trainable.param
            if group["lr"] == 0:
                continue
            key = (id(group), param.device)
            if key not in coefficients_by_group:  # lr·g_k/n per group and device
                coefficients_by_group[key] = [
                    (seed, (difference / (2 * group["eps"]) * (group["lr"] / self.n_samples)).to(param.device))
                    for seed, difference in estimates
                ]
            coefficients = coefficients_by_group[key]
            accumulate_dtype = torch.promote_types(param.dtype, torch.float32)
            flat = param.view(-1) if param.is_contiguous() else param.reshape(-1)
            for chunk_index, start, stop in _chunks(param.numel()):
                chunk = flat[start:stop]
                # fp32/fp64 parameters are their own accumulator; lower precision rounds once, at the end
                accumulator = chunk if chunk.dtype == accumulate_dtype else chunk.to(accumulate_dtype)
                if group["weight_decay"] != 0:
                    accumulator.mul_(1 - group["lr"] * group["weight_decay"])
                for seed, coefficient in coefficients:
                    z = self._directions.chunk(param, seed, trainable.index, chunk_index, stop - start)
                    accumulator.addcmul_(z.to(param.dtype).to(accumulate_dtype), coefficient, value=-1)
                if accumulator is not chunk:
                    chunk.copy_(accumulator)
            if not param.is_contiguous():
                param.copy_(flat.view(param.shape))


def _as_scalar_tensor(value: Tensor | float) -> Tensor:
    """The objective as a 0-dim tensor of at least fp32 precision (Python numbers become fp32)."""
    if isinstance(value, Tensor):
        return value.reshape(()).to(torch.promote_types(value.dtype, torch.float32))
    return torch.tensor(value, dtype=torch.float32)
