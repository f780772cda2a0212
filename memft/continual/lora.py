"""Sequential LoRA: one peft LoRA adapter (arXiv 2106.09685) trained on task after task; the baseline."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from memft.continual.base import LLAMA_LINEAR, ContinualMethod
from memft.continual.serialization import tensor_bytes


@dataclass
class LoRAOptions:
    """r: adapter rank; alpha: updates scaled by alpha / r; target_modules: Linear name suffixes or
    'all-linear'."""
    r: int = 8
    alpha: float = 16.0
    target_modules: list[str] | str = field(default_factory=lambda: list(LLAMA_LINEAR))

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer (the adapter rank), got {self.r!r}.")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (updates are scaled by alpha / r), got {self.alpha!r}.")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise ValueError(f"target_modules must be a list of module name suffixes or 'all-linear', got "
                             f"'{self.target_modules}'.")

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=0.0, target_modules=self.target_modules,
                          bias="none", task_type="CAUSAL_LM")


def lora_parameters(model: nn.Module, adapter: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of one peft adapter's LoRA factors, in a fixed order."""
    return [(n, p) for n, p in model.named_parameters() if ".lora_" in n and n.endswith(f".{adapter}.weight")]


class SequentialLoRA(ContinualMethod):
    """One LoRA adapter, trained on each task in turn with nothing to prevent forgetting."""

    name = "lora"
    adapter = "default"

    def __init__(self, options: LoRAOptions | None = None):
        super().__init__()
        self.options = options or LoRAOptions()

    def attach(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        self.model = get_peft_model(model, self.options.lora_config(), adapter_name=self.adapter)
        return self.model

    def state_dict(self) -> dict:
        return {"adapter": {n: p.detach().clone() for n, p in lora_parameters(self._attached(), self.adapter)}}

    def load_state_dict(self, state: dict) -> None:
        _copy_into(lora_parameters(self._attached(), self.adapter), state["adapter"], "adapter")

    def parameter_bytes(self) -> dict[str, int]:
        size = tensor_bytes(p for _, p in lora_parameters(self._attached(), self.adapter))
        return {"trainable": size, "adapter_total": size}


def _copy_into(parameters: list[tuple[str, nn.Parameter]], saved: dict, what: str) -> None:
    names = [n for n, _ in parameters]
    if sorted(names) != sorted(saved):
        raise ValueError(f"saved {what} does not match this model: {len(saved)} saved tensors, {len(names)} "
                         "in the model. Load a state saved with the same model and options.")
    for name, param in parameters:
        param.data.copy_(saved[name])
