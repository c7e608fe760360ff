"""Slow, obviously-correct reference implementations used only by the tests."""

from __future__ import annotations

import torch


def direct_causal_conv(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """u (B, H, L), kernel (C, H, Lk) -> (B, C, H, L) by the definition sum_{j<=t} k[t-j] u[j]."""
    b, h, length = u.shape
    c = kernel.shape[0]
    k = torch.zeros(c, h, length, dtype=kernel.dtype)
    taps = min(length, kernel.shape[-1])
    k[..., :taps] = kernel[..., :taps]
    y = torch.zeros(b, c, h, length, dtype=torch.promote_types(u.dtype, kernel.dtype))
    for t in range(length):
        # y[t] = sum_j k[t - j] u[j], j = 0..t
        window = u[..., : t + 1].flip(-1)                                       # u[t], ..., u[0]
        y[..., t] = (k[None, ..., : t + 1] * window[:, None]).sum(-1)
    return y


def zoh_discretize(dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """Zero-order hold by the matrix exponential of [[dt A, dt B], [0, 0]] for diagonal complex A.

    dt (...,), a (..., N) complex, b (..., N) complex -> (dA (..., N, N), dB (..., N)).
    """
    n = a.shape[-1]
    m = torch.zeros(*a.shape[:-1], n + 1, n + 1, dtype=torch.complex128)
    m[..., :n, :n] = torch.diag_embed(a.to(torch.complex128)) * dt[..., None, None]
    m[..., :n, n] = b.to(torch.complex128) * dt[..., None]
    e = torch.linalg.matrix_exp(m)
    return e[..., :n, :n], e[..., :n, n]


def run_recurrence(da: torch.Tensor, db: torch.Tensor, c: torch.Tensor, u: torch.Tensor,
                   real_scale: float = 1.0) -> torch.Tensor:
    """x_t = dA x_{t-1} + dB u_t, y_t = real_scale * Re(C x_t), step by step.

    da (C, H, N, N), db/c (C, H, N) complex, u (B, H, L) real -> y (B, C, H, L).
    """
    bsz, _, length = u.shape
    x = torch.zeros(bsz, *db.shape, dtype=torch.complex128)
    ys = []
    for t in range(length):
        x = torch.einsum("chnm,bchm->bchn", da, x) + db * u[:, None, :, t, None]
        ys.append(real_scale * (c * x).sum(-1).real)
    return torch.stack(ys, dim=-1)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    allowed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-query softmax attention. q (Lq, H, Dh), k/v (Lk, H, Dh), allowed (Lq, Lk) bool,
    bias (H, Lq, Lk) or None. Logits are not rescaled."""
    lq, h, _ = q.shape
    out = torch.zeros_like(q)
    for i in range(lq):
        idx = allowed[i].nonzero().flatten()
        for head in range(h):
            logits = k[idx, head] @ q[i, head]
            if bias is not None:
                logits = logits + bias[head, i, idx]
            out[i, head] = torch.softmax(logits, 0) @ v[idx, head]
    return out


@torch.no_grad()
def greedy_by_full_forward(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by a full forward pass over the whole sequence for every new token."""
    model.eval()
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def word_corpus(root, documents: int = 120, words_per_document: int = 60):
    """Write `documents` small documents of structured text into the directory `root` (a
    pathlib.Path, made if missing): learnable, and with 120 every split non-empty. Returns `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        words = [WORDS[(i * 7 + j * (i % 5 + 1)) % len(WORDS)] for j in range(words_per_document)]
        (root / f"doc{i:03d}.txt").write_text(f"document {i}\n" + " ".join(words) + "\n")
    return root
