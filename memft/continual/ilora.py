"""I-LoRA: interpolation-based LoRA with dual-memory experience replay (Ren et al., arXiv 2402.18865).

Two peft LoRA adapters on the same layers: the fast learner (trained) and the slow learner, which
follows it by parameter interpolation after every optimizer step,

    slow <- lambda * slow + (1 - lambda) * fast          (each LoRA factor, elementwise)

A reservoir buffer (memft.continual.replay) keeps examples of all tasks seen so far. Each step, with a
replay batch R drawn from the buffer before the current batch is added to it,

    loss = CE_fast(current) + CE_fast(R) + consistency_weight * mean_l MSE(h_l^fast(R), h_l^slow(R))

where h_l are the decoder layers' hidden states (padding excluded) and the slow learner's are constants:
the fast learner is pulled toward the slow one on old data. Current and replayed rows share one forward
pass (each cross-entropy is still the mean over its own answer tokens). The slow learner is evaluated by
default.

Differences from the released reference (which47/LLMCL, method/ILORA.py), on purpose: the sequence
continues across task boundaries (after task 1 the reference calls a `load_ema_model` method that does
not exist);
replayed labels are padded with -100 (the reference left-pads labels with token 0 and trains on them);
the consistency target is the slow learner's hidden state (the reference uses the elementwise maximum of
fast and slow states); no EMA warm-up min(1 - 1/(t+1), lambda), so the update is exactly the formula above.
The buffer and both adapters are in `state_dict()`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memft.continual.base import ContinualMethod
from memft.continual.lora import LoRAOptions, _copy_into, lora_parameters
from memft.continual.replay import ReplayBuffer
from memft.continual.serialization import tensor_bytes
from memft.train.data import IGNORE_INDEX

FAST, SLOW = "fast", "slow"


@dataclass
class ILoRAOptions(LoRAOptions):
    """ema_lambda: slow-learner interpolation weight lambda (0.25, the authors' released code; the slow
    learner trails the fast one by about 1 / (1 - lambda) steps, so keep that well below the steps per
    task); buffer_size: reservoir capacity (reference 500); replay_batch_size: replayed examples per step
    (None: the current batch size); consistency_weight: weight of the hidden-state MSE (reference 1.0);
    eval_adapter: 'slow' or 'fast'; seed: buffer RNG."""
    ema_lambda: float = 0.25
    buffer_size: int = 500
    replay_batch_size: int | None = None
    consistency_weight: float = 1.0
    eval_adapter: str = SLOW
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.ema_lambda < 1.0:
            raise ValueError(f"ema_lambda must be in [0, 1) (slow <- lambda*slow + (1-lambda)*fast), got "
                             f"{self.ema_lambda!r}.")
        if not isinstance(self.buffer_size, int) or self.buffer_size < 1:
            raise ValueError(f"buffer_size must be a positive integer, got {self.buffer_size!r}.")
        if self.replay_batch_size is not None and (not isinstance(self.replay_batch_size, int)
                                                   or self.replay_batch_size < 1):
            raise ValueError(f"replay_batch_size must be a positive integer or None (same as the batch "
                             f"size), got {self.replay_batch_size!r}.")
        if self.consistency_weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {self.consistency_weight!r}.")
        if self.eval_adapter not in (FAST, SLOW):
            raise ValueError(f"eval_adapter must be 'slow' or 'fast', got {self.eval_adapter!r}.")


def masked_hidden_mse(fast: tuple[torch.Tensor, ...], slow: tuple[torch.Tensor, ...],
                      mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the mean squared difference over unmasked tokens and features.

    fast, slow: per-layer hidden states [B, S, D]; mask: [B, S] (1 on real tokens).
    """
    weights = mask.unsqueeze(-1).to(fast[0].dtype)
    denominator = weights.sum() * fast[0].shape[-1]
    per_layer = [((f - s.detach()) ** 2 * weights).sum() / denominator for f, s in zip(fast, slow)]
    return torch.stack(per_layer).mean()


def _concat_rows(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack two right-padded batches (input_ids, attention_mask, labels), padding to the longer one."""
    length = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    fill = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {key: torch.cat([F.pad(x[key], (0, length - x[key].shape[1]), value=value) for x in (a, b)])
            for key, value in fill.items()}


class ILoRA(ContinualMethod):
    name = "ilora"

    def __init__(self, options: ILoRAOptions | None = None):
        super().__init__()
        self.options = options or ILoRAOptions()
        self.buffer = ReplayBuffer(self.options.buffer_size, self.options.seed)
        self.steps = 0
        self.pad_id = 0

    def attach(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        config = self.options.lora_config()
        self.pad_id = getattr(model.config, "pad_token_id", None) or 0
        self.model = get_peft_model(model, config, adapter_name=FAST)
        self.model.add_adapter(SLOW, config)
        with torch.no_grad():
            for fast, slow in self._pairs():
                slow.copy_(fast)
        self.model.set_adapter(FAST)
        return self.model

    def _pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        model = self._attached()
        fast = lora_parameters(model, FAST)
        slow = dict(lora_parameters(model, SLOW))
        return [(p, slow[name[: -len(f".{FAST}.weight")] + f".{SLOW}.weight"]) for name, p in fast]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in lora_parameters(self._attached(), FAST)]

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        model = self._attached()
        replay = self.buffer.sample(self.options.replay_batch_size or batch["input_ids"].shape[0], self.pad_id)
        self.buffer.add_batch({k: v.detach().cpu() for k, v in batch.items()})
        if replay is None:
            return model(**batch).loss
        replay = {k: v.to(batch["input_ids"].device) for k, v in replay.items()}
        with torch.no_grad(), self._adapter(SLOW):  # first: switching adapters toggles requires_grad
            slow_states = model(input_ids=replay["input_ids"], attention_mask=replay["attention_mask"],
                                output_hidden_states=True).hidden_states[1:]
        # current and replayed rows in one forward pass (right padding keeps each row's outputs unchanged)
        joint = _concat_rows(batch, replay)
        out = model(input_ids=joint["input_ids"], attention_mask=joint["attention_mask"], output_hidden_states=True)
        n = batch["input_ids"].shape[0]
        token_loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), joint["labels"][:, 1:].flatten(),
                                     ignore_index=IGNORE_INDEX, reduction="none").view(joint["labels"].shape[0], -1)
        scored = (joint["labels"][:, 1:] != IGNORE_INDEX).to(token_loss.dtype)
        current = (token_loss[:n] * scored[:n]).sum() / scored[:n].sum().clamp(min=1)
        replayed = (token_loss[n:] * scored[n:]).sum() / scored[n:].sum().clamp(min=1)
        length = replay["input_ids"].shape[1]
        fast_states = tuple(h[n:, :length] for h in out.hidden_states[1:])
        consistency = masked_hidden_mse(fast_states, slow_states, replay["attention_mask"])
        return current + replayed + self.options.consistency_weight * consistency

    @torch.no_grad()
    def after_step(self) -> None:
        lam = self.options.ema_lambda
        for fast, slow in self._pairs():
            slow.mul_(lam).add_(fast, alpha=1.0 - lam)
        self.steps += 1

    @contextmanager
    def _adapter(self, name: str) -> Iterator[None]:
        model = self._attached()
        model.set_adapter(name, inference_mode=True)
        try:
            yield
        finally:
            model.set_adapter(FAST)

    @contextmanager
    def evaluating(self) -> Iterator[nn.Module]:
        with super().evaluating() as model, self._adapter(self.options.eval_adapter):
            yield model

    def state_dict(self) -> dict:
        model = self._attached()
        return {"fast": {n: p.detach().clone() for n, p in lora_parameters(model, FAST)},
                "slow": {n: p.detach().clone() for n, p in lora_parameters(model, SLOW)},
                "buffer": self.buffer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        model = self._attached()
        _copy_into(lora_parameters(model, FAST), state["fast"], "fast adapter")
        _copy_into(lora_parameters(model, SLOW), state["slow"], "slow adapter")
        self.buffer.load_state_dict(state["buffer"])
        self.steps = int(state["steps"])

    def parameter_bytes(self) -> dict[str, int]:
        model = self._attached()
        fast = tensor_bytes(p for _, p in lora_parameters(model, FAST))
        slow = tensor_bytes(p for _, p in lora_parameters(model, SLOW))
        # the buffer as int64 ids + labels
        return {"trainable": fast, "slow_adapter": slow, "adapter_total": fast + slow,
                "replay_buffer": 2 * 8 * self.buffer.num_tokens()}
