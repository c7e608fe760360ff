"""Sampling from a model: `generate(model, prompts, max_new_tokens, ...)`.

Generation uses only the model's inference entry points (`allocate_inference_cache`, `prefill`,
`step`; see `blockstate.cache` for what each layer keeps): the prompt is prefilled in parallel and
every new token is one step through every layer, whose cost does not grow with the context for the
S4, S4D and selective SSMs, sliding-window and block attention, MF summaries and Block-Recurrent
states (full attention's keys/values and unstructured kernels' input history do grow).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import nn


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V)."""
    logits = logits.float().cpu()
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Logits (B, V) with -inf outside the top_k most likely tokens and outside the smallest set of
    most likely tokens whose probability reaches top_p (nucleus); None disables a filter."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p   # the mass before a token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def _token_ids(prompt: Sequence[int]) -> list[int]:
    ids = []
    for token in prompt:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise ValueError(f"prompt token ids must be integers, got {token!r} "
                             f"({type(token).__name__})")
        ids.append(int(token))
    return ids


def _check(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float,
           top_k: int | None, top_p: float | None) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must contain at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature} must be a finite number >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None)")
    model.warn_past_training_length(max(len(p) for p in prompts) + max_new_tokens)


@torch.no_grad()
def generate(model: nn.Module, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, stop: Sequence[int] = (),
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Each prompt followed by up to `max_new_tokens` sampled tokens (greedy when temperature is
    0), stopping a row after any token in `stop` (which is kept). `on_token(row, token)` is called
    for every new token as it is produced (for streaming).

    All rows run as one batch through the model's inference cache: the shortest prompt's length is
    prefilled in parallel, then every row advances one position per step, longer prompts feeding
    their own next token until they end (so every row's logits are exactly its own forward
    pass's)."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()  # float or bool entries are refused by _token_ids
    prompts = [_token_ids(p) for p in prompts]
    _check(model, prompts, max_new_tokens, temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompts, max_new_tokens, temperature, top_k, top_p, seed,
                         set(stop), on_token)
    finally:
        model.train(was_training)


def _generate(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_ids, on_token):
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    results: list[list[int]] = [list(p) for p in prompts]
    if max_new_tokens == 0:
        return results
    lengths = [len(p) for p in prompts]
    shortest, longest = min(lengths), max(lengths)
    cache = model.allocate_inference_cache(len(prompts))
    tokens = torch.tensor([p[:shortest] for p in prompts], dtype=torch.long, device=device)
    logits = model.prefill(tokens, cache)[:, -1]                                   # (B, V)
    produced = [0] * len(prompts)
    done = [False] * len(prompts)
    for position in range(shortest, longest + max_new_tokens):
        sampled = _sample(logits, temperature, top_k, top_p, generator).tolist()   # (B,)
        step_tokens = []
        for row, token in enumerate(sampled):
            if position < lengths[row]:  # still inside its prompt
                step_tokens.append(prompts[row][position])
                continue
            step_tokens.append(token)
            if done[row] or produced[row] == max_new_tokens:
                continue
            results[row].append(token)
            produced[row] += 1
            if on_token is not None:
                on_token(row, token)
            done[row] = token in stop_ids
        if all(d or n == max_new_tokens for d, n in zip(done, produced, strict=True)):
            break
        logits = model.step(torch.tensor(step_tokens, device=device), cache)
    return results
