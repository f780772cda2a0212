"""QLoRAM: 4-bit NF4 quantisation of the (pruned) decoder linears through bitsandbytes (arXiv 2502.13533, 2305.14314).

Every ``nn.Linear`` inside the decoder layers becomes a ``bitsandbytes.nn.Linear4bit`` holding NF4 codes (two per
byte) with one absmax per block of 64 weights; with ``double_quant=True`` (QLoRA's double quantisation, the LoRAM
reference setting) the absmax values are themselves 8-bit quantised in blocks of 256. Embeddings, norms and (by
default) ``lm_head`` stay in their dtype, as in Hugging Face's bitsandbytes integration.

Devices: CUDA always; CPU when the installed bitsandbytes has a CPU 4-bit backend (checked at call time, with a
clear error otherwise).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import decoder_layers

NF4_BLOCKSIZE = 64
DOUBLE_QUANT_BLOCKSIZE = 256
QUANTIZE_CHOICES = (None, "nf4")


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            "quantize='nf4' needs bitsandbytes; install it with `pip install memft[bnb]` (or bitsandbytes>=0.45)."
        ) from err
    return bitsandbytes


def _check_device_support(bnb, device: torch.device) -> None:
    """Quantise one tiny block on ``device``; raise RuntimeError naming the fix if bitsandbytes cannot."""
    try:
        bnb.functional.quantize_4bit(torch.zeros(NF4_BLOCKSIZE, device=device), quant_type="nf4")
    except Exception as err:  # bitsandbytes raises assorted types for a missing backend
        raise RuntimeError(
            f"bitsandbytes {bnb.__version__} cannot quantise to 4-bit NF4 on device {device} ({err}). 4-bit on CPU "
            "needs bitsandbytes >= 0.46 with its CPU backend; otherwise move the model to a CUDA GPU before "
            "quantize='nf4', or train without quantisation (quantize=None)."
        ) from err


def _to_linear4bit(bnb, linear: nn.Linear, compute_dtype: torch.dtype, double_quant: bool) -> nn.Module:
    device = linear.weight.device
    quantized = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
        device="meta",
    )
    quantized.weight = bnb.nn.Params4bit(
        linear.weight.data,
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=double_quant,
        blocksize=NF4_BLOCKSIZE,
    )
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.data, requires_grad=linear.bias.requires_grad)
    return quantized.to(device)


def quantize_nf4(
    model: nn.Module,
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = True,
    include_lm_head: bool = False,
) -> nn.Module:
    """Replace the decoder's ``nn.Linear`` layers (and optionally ``lm_head``) by NF4 ``Linear4bit``, in place.

    ``compute_dtype``: dtype of the dequantised matmul (default: the model's embedding dtype).
    """
    bnb = _bitsandbytes()
    embedding = model.get_input_embeddings().weight
    compute_dtype = compute_dtype or embedding.dtype
    _check_device_support(bnb, embedding.device)
    targets: list[tuple[nn.Module, str, nn.Linear]] = []
    for layer in decoder_layers(model):
        for parent in layer.modules():
            targets += [(parent, n, c) for n, c in parent.named_children() if type(c) is nn.Linear]
    head = model.get_output_embeddings() if include_lm_head else None
    if include_lm_head and (type(head) is not nn.Linear or head.weight is embedding):
        raise ValueError(
            f"include_lm_head=True needs an untied nn.Linear lm_head; this model's output layer is a "
            f"{type(head).__name__} (tied to the input embeddings: {head is not None and head.weight is embedding}). "
            "Leave include_lm_head=False for this model."
        )
    for parent, name, linear in targets:
        setattr(parent, name, _to_linear4bit(bnb, linear, compute_dtype, double_quant))
    if head is not None:
        model.set_output_embeddings(_to_linear4bit(bnb, head, compute_dtype, double_quant))
    return model
