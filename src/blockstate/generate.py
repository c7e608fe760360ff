"""Sampling from a language model.

`sample_by_full_forward` recomputes the whole (truncated) context for every new token: simple and
obviously correct, but its cost grows with the context.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def sample_by_full_forward(model: nn.Module, prompt: list[int], max_new_tokens: int,
                           temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
                           context: int | None = None, device: torch.device | str = "cpu") -> list[int]:
    """Prompt followed by `max_new_tokens` sampled tokens (greedy when temperature == 0).

    Each step runs the model on the last `context` tokens (default: the model's training length).
    """
    if not prompt:
        raise ValueError("prompt must contain at least one token")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    context = context or model.config.max_seq_len
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        window = torch.tensor([tokens[-context:]], dtype=torch.long, device=device)
        logits = model(window)[0, -1].float().cpu()                               # (V,)
        if temperature == 0:
            tokens.append(int(logits.argmax()))
            continue
        logits = logits / temperature
        if top_k is not None and top_k < logits.numel():
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        tokens.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)))
    model.train(was_training)
    return tokens
