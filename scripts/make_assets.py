"""Rebuild memft's bundled data, tokenizer and tiny pretrained base model.

    python scripts/make_assets.py            # data + tokenizer + base model (a few minutes on 2 CPU cores)
    python scripts/make_assets.py --data-only

Outputs (committed to the repository, shipped inside the package):
    memft/data/text.txt        plain-text paragraphs about a synthetic world
    memft/data/alpaca.jsonl    instruction / input / output records
    memft/data/chat.jsonl      the same kind of content as chat `messages`
    memft/assets/tiny-llama/   tokenizer (byte-level BPE, 1024 tokens, chat template) and a
                               ~0.9M-parameter Llama pretrained on text.txt (safetensors, fp32)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "memft" / "data"
MODEL_DIR = ROOT / "memft" / "assets" / "tiny-llama"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def write_data(seed: int = 0) -> None:
    from memft.data.synthetic import chat_examples, instruction_examples, make_world, text_corpus

    rng = random.Random(seed)
    world = make_world(seed)
    (DATA / "text.txt").write_text("\n".join(text_corpus(world, rng, 600)) + "\n")
    alpaca = instruction_examples(world, rng, 1500)
    with open(DATA / "alpaca.jsonl", "w") as f:
        for ex in alpaca:
            f.write(json.dumps(ex) + "\n")
    with open(DATA / "chat.jsonl", "w") as f:
        for ex in chat_examples(instruction_examples(world, rng, 400)):
            f.write(json.dumps(ex) + "\n")


def train_tokenizer() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = (DATA / "text.txt").read_text().splitlines()
    texts += [json.dumps(json.loads(line)) for line in (DATA / "alpaca.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=1024)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(MODEL_DIR)


def pretrain(minutes: float) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    ids: list[int] = []
    for line in (DATA / "text.txt").read_text().splitlines():
        ids += tok(line)["input_ids"] + [tok.eos_token_id]
    seq = 128
    data = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    total_steps = 10_000
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    start, step = time.time(), 0
    while time.time() - start < minutes * 60:
        batch = data[torch.randint(len(data), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    print(f"pretrained {step} steps, final loss {loss.item():.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-only", action="store_true")
    parser.add_argument("--minutes", type=float, default=6.0, help="pretraining wall time")
    args = parser.parse_args()
    write_data()
    if not args.data_only:
        train_tokenizer()
        pretrain(args.minutes)
