"""A tiny language model with the projections GaLore targets (q_proj, up_proj, down_proj) and the plain
parameters it does not (embedding, norm, head), for optimizer tests."""

import torch
from torch import nn


class TinyModel(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 24)
        self.q_proj = nn.Linear(24, 40)
        self.up_proj = nn.Linear(40, 72, bias=False)
        self.down_proj = nn.Linear(72, 24, bias=False)
        self.norm = nn.LayerNorm(24)
        self.lm_head = nn.Linear(24, vocab, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.down_proj(torch.relu(self.up_proj(torch.tanh(self.q_proj(h)))))
        return self.lm_head(self.norm(h))
