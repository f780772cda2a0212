"""HF integration of cut cross-entropy (arXiv 2411.09009): patched tiny causal LMs against unpatched ones.

Each family available in the installed transformers is built from a tiny config (fp32, eval mode so
dropout is off).  Tolerances (relative norm): loss 1e-5, every parameter gradient 1e-4 (the two runs
differ only in the fp32 summation order of the loss).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from memft.losses import SUPPORTED_MODEL_TYPES, cut_cross_entropy_loss, patch_loss, unpatch_loss  # noqa: E402

VOCAB = 128
FAMILY_CONFIGS = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "final_logit_softcapping": 3.0},
    "gemma3_text": {"head_dim": 16, "final_logit_softcapping": 3.0},
    "gpt2": None,
}


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def tiny_model(model_type: str, seed: int = 0):
    try:
        if model_type == "gpt2":
            config = transformers.AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                       bos_token_id=0, eos_token_id=0)
        else:
            config = transformers.AutoConfig.for_model(
                model_type, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, vocab_size=VOCAB, **FAMILY_CONFIGS[model_type])
    except (KeyError, ValueError) as exc:
        pytest.skip(f"{model_type} is not available in this transformers: {exc}")
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).float().eval()


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (2, 10), generator=g)
    labels = input_ids.clone()
    labels[0, :3] = -100
    labels[1, -2:] = -100
    return input_ids, labels


def loss_and_grads(model, **kwargs):
    model.zero_grad()
    out = model(**kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("model_type", list(FAMILY_CONFIGS))
def test_patched_family_matches_unpatched(model_type):
    assert model_type in SUPPORTED_MODEL_TYPES
    model = tiny_model(model_type)
    input_ids, labels = batch()
    ref_out, ref_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    ref_logits = model(input_ids=input_ids).logits

    handle = patch_loss(model, "cut_cross_entropy", impl="torch")
    out, grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    assert out.logits is None
    assert rel(out.loss, ref_out.loss) < 1e-5
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert rel(grad, ref_grads[name]) < 1e-4, name
    assert torch.equal(model(input_ids=input_ids).logits, ref_logits)

    handle.undo()
    assert "forward" not in model.__dict__
    assert torch.equal(model(input_ids=input_ids).logits, ref_logits)


def test_num_items_in_batch_and_return_tuple():
    model = tiny_model("llama")
    input_ids, labels = batch(1)
    num_items = torch.tensor(31)
    ref = model(input_ids=input_ids, labels=labels, num_items_in_batch=num_items).loss
    patch_loss(model)
    loss = model(input_ids=input_ids, labels=labels, num_items_in_batch=num_items).loss
    assert rel(loss, ref) < 1e-5
    mean_loss = model(input_ids=input_ids, labels=labels).loss
    valid = int((labels[:, 1:] != -100).sum())
    assert rel(loss * 31 / valid, mean_loss) < 1e-5
    as_tuple = model(input_ids=input_ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and rel(as_tuple[0], mean_loss) < 1e-6
    unpatch_loss(model)
    assert model(input_ids=input_ids, labels=labels).logits is not None


def test_cut_cross_entropy_loss_matches_hf_loss_function():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[1, :4] = -100
    logits = hidden @ weight.t()
    for num_items in (None, 20):
        ref = transformers.loss.loss_utils.ForCausalLMLoss(logits, labels, 50, num_items_in_batch=num_items)
        loss = cut_cross_entropy_loss(hidden, weight, labels, num_items_in_batch=num_items)
        assert rel(loss, ref) < 1e-5
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    unshifted = cut_cross_entropy_loss(hidden, weight, shifted, shift=False)
    assert rel(unshifted, cut_cross_entropy_loss(hidden, weight, labels)) < 1e-7
    assert rel(cut_cross_entropy_loss(hidden, weight, labels, shift_labels=shifted), unshifted) < 1e-7


def test_peft_lora_model_matches_unpatched():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    peft_model = peft.get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    input_ids, labels = batch(3)
    ref_out, ref_grads = loss_and_grads(peft_model, input_ids=input_ids, labels=labels)
    patch_loss(peft_model)
    out, grads = loss_and_grads(peft_model, input_ids=input_ids, labels=labels)
    assert out.logits is None and rel(out.loss, ref_out.loss) < 1e-5
    assert any("modules_to_save" in name for name in grads)
    for name, grad in grads.items():
        assert rel(grad, ref_grads[name]) < 1e-4, name
    unpatch_loss(peft_model)


def test_lora_on_lm_head_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="peft tuner layer"):
        patch_loss(model)


def test_bad_uses_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="loss="):
        patch_loss(model, "focal")
    with pytest.raises(ValueError, match="impl="):
        patch_loss(model, impl="cuda")
    with pytest.raises(ValueError, match="no loss patch"):
        unpatch_loss(model)
    patch_loss(model)
    with pytest.raises(ValueError, match="already patched"):
        patch_loss(model)
    with pytest.raises(TypeError):
        patch_loss("llama")
    bert = transformers.AutoModelForMaskedLM.from_config(transformers.AutoConfig.for_model(
        "bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="supports model types"):
        patch_loss(bert)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_fused_lm_head_contract(model_type):
    """``fused_lm_head=True`` (TRL's call) gives per-token log-probabilities with the patched loss's gradients,
    and entropy / top-1 of the full logits."""
    reference, model = tiny_model(model_type), tiny_model(model_type)
    patch_loss(model)
    input_ids, labels = batch()
    expected, expected_grads = loss_and_grads(reference, input_ids=input_ids, labels=labels)
    logits = reference(input_ids=input_ids).logits[:, :-1].detach().double()
    out, grads = loss_and_grads(model, input_ids=input_ids, labels=labels, fused_lm_head=True)
    mask = labels[:, 1:] != -100
    assert torch.equal(out.label_mask, mask)
    picked = logits.log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.log_probs.double(), torch.where(mask, picked, 0.0), rtol=1e-5, atol=1e-5)
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    assert max(rel(grads[n], expected_grads[n]) for n in expected_grads) < 1e-4
    entropy = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(out.entropy.double(), torch.where(mask, entropy, 0.0), rtol=1e-4, atol=1e-4)
    assert torch.equal(out.is_top1, mask & (logits.argmax(-1) == labels[:, 1:]))


def test_training_the_decoder_outside_the_patched_forward_is_refused():
    """A loss path that skips the patched forward (TRL's own fused head) fails at once, naming the fix;
    inference through the decoder and the patched forward itself are untouched."""
    model = tiny_model("llama")
    handle = patch_loss(model)
    input_ids, labels = batch()
    model.model(input_ids=input_ids)  # eval mode
    model.train()
    with torch.no_grad():
        model.model(input_ids=input_ids)
    model(input_ids=input_ids, labels=labels).loss.backward()
    model(input_ids=input_ids)  # no labels: the original forward, still inside the patch
    with pytest.raises(RuntimeError, match="MemftTrainerMixin"):
        model.model(input_ids=input_ids)
    handle.undo()
    model.model(input_ids=input_ids)
