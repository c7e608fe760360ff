"""Evaluation of a checkpoint: `blockstate eval`.

Perplexity per token and bits per byte (comparable across tokenizers) on a corpus split, at one or
several evaluation lengths (the paper's length-generalization protocol evaluates at lengths other
than the training length), plus the loss as a function of the position in the sequence.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .carry import carry_for
from .data import (
    PackedSequences,
    Tokenizer,
    default_cache_dir,
    resolve_corpus,
    tokenize_split,
)
from .device import autocast_dtype, resolve_device
from .loading import load_with_checkpoint
from .model import BlockStateLM


def token_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device,
               precision: str = "auto", **forward: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy (nats) over non-ignored targets, and the per-token losses.
    `forward`: passed to the model (a segment-recurrent model's `carry` and `keep`)."""
    dtype = autocast_dtype(precision, device)
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(inputs, **forward)
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                             reduction="none").view_as(targets)
    return losses.sum(), losses


@torch.no_grad()
def iter_losses(model: nn.Module, dataset: PackedSequences, batch_size: int, max_batches: int | None,
                device: torch.device, indices: np.ndarray | None = None, carry: bool = True,
                precision: str = "auto"):
    """Yield (targets, per-token losses) for at most `max_batches` batches of `dataset`'s windows,
    read as the model's carried state (`blockstate.carry.carry_for`) reads them: the windows
    `indices` in order (default all), or, for a model that carries memory from batch to batch
    (unless `carry` is false), lanes of consecutive windows of whole documents in corpus order,
    with the memory carried."""
    carried = carry_for(model.config, carry)
    for inputs, targets, *extra in carried.evaluation_batches(dataset, batch_size, max_batches,
                                                              indices):
        used = _scored_columns(targets, model.config.block_size)
        forward = carried.forward_args(extra, slice(None), device)
        _, losses = token_loss(model, inputs[:, :used].to(device), targets[:, :used].to(device),
                               device, precision=precision, **forward)
        carried.after_batch([forward])
        yield targets, F.pad(losses.cpu(), (0, targets.shape[1] - used))


def _scored_columns(targets: torch.Tensor, block_size: int) -> int:
    """Columns of a batch up to its last scored target, rounded up to whole blocks (at most all):
    the padding after it cannot change earlier outputs (causality), so it is not computed, and
    evaluation memory follows the tokens scored, not the window length."""
    scored = (targets != -100).any(0).nonzero()
    used = int(scored.max()) + 1 if len(scored) else 1
    return min(targets.shape[1], -(-used // block_size) * block_size)


@torch.no_grad()
def evaluate_batches(model: nn.Module, dataset: PackedSequences, tokenizer: Tokenizer,
                     batch_size: int, max_batches: int | None, device: torch.device,
                     carry: bool = True, precision: str = "auto",
                     indices: np.ndarray | None = None) -> dict[str, float]:
    """Loss, perplexity and bits per byte over the windows `indices` of `dataset` (default: its
    first windows, in order), at most `max_batches` batches of them. A model that carries memory
    reads lanes of consecutive windows of whole documents instead (`iter_losses`)."""
    was_training = model.training
    model.eval()
    byte_lengths = torch.as_tensor(tokenizer.token_byte_lengths(), dtype=torch.float64)
    nll, count, n_bytes = 0.0, 0, 0.0
    for targets, losses in iter_losses(model, dataset, batch_size, max_batches, device,
                                       indices=indices, carry=carry, precision=precision):
        valid = targets != -100
        nll += float(losses[valid].double().sum())
        count += int(valid.sum())
        n_bytes += float(byte_lengths[targets[valid]].sum())
    model.train(was_training)
    loss = nll / max(1, count)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count,
            "bits_per_byte": nll / math.log(2) / max(1.0, n_bytes)}


def unigram_perplexity(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Perplexity on `eval_tokens` of the add-one unigram model fitted to `train_tokens`: the
    baseline a language model must beat."""
    counts = np.bincount(np.asarray(train_tokens), minlength=vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    eval_counts = np.bincount(np.asarray(eval_tokens), minlength=vocab_size)
    return float(np.exp(-(eval_counts @ log_p) / eval_counts.sum()))


POSITION_BINS = 64


def spread_windows(dataset: PackedSequences, max_tokens: int | None) -> np.ndarray:
    """Indices of about max_tokens / seq_len windows spread evenly over `dataset` (all if None)."""
    n = len(dataset)
    take = n if max_tokens is None else max(1, min(n, math.ceil(max_tokens / dataset.seq_len)))
    return np.unique(np.linspace(0, n - 1, take).round().astype(np.int64))


def aligned_windows(dataset: PackedSequences, outer: PackedSequences, outer_indices: np.ndarray
                    ) -> np.ndarray:
    """Indices of the windows of `dataset` that tile the windows `outer_indices` of `outer`, a
    packing of the same split at a multiple of dataset's length: both then score the same targets."""
    if outer.seq_len % dataset.seq_len:
        raise ValueError(f"length {dataset.seq_len} does not divide {outer.seq_len}")
    starts, ends = outer.starts[outer_indices], outer.ends[outer_indices]          # (n,) each
    lo = np.searchsorted(dataset.starts, starts)                                   # (n,)
    hi = np.searchsorted(dataset.starts, starts + outer.seq_len)                   # (n,)
    index = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi, strict=True)]) if len(lo) else lo
    return index[dataset.ends[index] == np.repeat(ends, hi - lo)]  # not the next document's


def tiled_windows(tokens, lengths: list[int], pad_id: int, max_tokens: int | None
                  ) -> dict[int, tuple[PackedSequences, np.ndarray]]:
    """For each of `lengths` (each dividing the longest), the packing of `tokens` at that length
    and the indices of its windows that tile about `max_tokens` tokens of windows of the longest
    length spread over `tokens`: every length then scores the same targets."""
    longest = PackedSequences(tokens, max(lengths), pad_id)
    outer_indices = spread_windows(longest, max_tokens)
    tiled = {}
    for length in lengths:
        dataset = longest if length == longest.seq_len else PackedSequences(tokens, length, pad_id)
        tiled[length] = (dataset, aligned_windows(dataset, longest, outer_indices))
    return tiled


@torch.no_grad()
def evaluate_length(model: BlockStateLM, dataset: PackedSequences, byte_lengths: np.ndarray,
                    max_tokens: int | None, batch_tokens: int, device: torch.device,
                    indices: np.ndarray | None = None, carry: bool = True,
                    precision: str = "auto") -> dict[str, Any]:
    """Metrics over the windows `indices` of `dataset` (default: windows spread evenly, about
    max_tokens tokens), and the loss by position."""
    seq_len = dataset.seq_len
    n = len(dataset)
    indices = spread_windows(dataset, max_tokens) if indices is None else indices
    take = len(indices)
    batch = max(1, batch_tokens // seq_len)
    lengths = torch.as_tensor(byte_lengths, dtype=torch.float64)
    # positions that can hold a target: no window is longer than its document
    span = max(1, min(seq_len, int((dataset.ends - dataset.starts).max()) if n else 1))
    pos_loss = torch.zeros(span, dtype=torch.float64)
    pos_count = torch.zeros(span, dtype=torch.float64)
    nll, n_bytes, sequences = 0.0, 0.0, 0
    for targets, losses in iter_losses(model, dataset, batch, math.ceil(take / batch), device, indices,
                                       carry=carry, precision=precision):
        losses = losses.double()
        valid = targets != -100
        width = min(span, targets.shape[1])
        pos_loss[:width] += (losses * valid).sum(0)[:width]
        pos_count[:width] += valid.sum(0)[:width]
        nll += float(losses[valid].sum())
        n_bytes += float(lengths[targets[valid]].sum())
        sequences += len(targets)
    count = int(pos_count.sum())
    loss = nll / max(1, count)
    by_position = [{"start": start, "end": end,
                    "loss": float(pos_loss[start:end].sum() / max(1.0, float(pos_count[start:end].sum())))}
                   for start, end in _even_bins(seq_len, min(POSITION_BINS, seq_len))]
    return {"length": seq_len, "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": nll / math.log(2) / max(1.0, n_bytes), "tokens": count,
            "bytes": int(n_bytes), "sequences": sequences, "loss_by_position": by_position,
            "loss_by_block_range": loss_by_block_range(pos_loss, pos_count, model.config.block_size,
                                                       seq_len)}


def _even_bins(length: int, count: int) -> list[tuple[int, int]]:
    """[start, end) of `count` consecutive bins covering 0..length-1, sizes differing by at most
    one (the first ones larger), as numpy's array_split cuts them."""
    size, larger = divmod(length, count)
    bounds = [i * size + min(i, larger) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def block_ranges(block_size: int, length: int) -> list[tuple[int, int]]:
    """The ranges [0, W), [W, 2W), [2W, 4W), ... that cover positions 0..length-1 (the last one not
    cut at `length`): positions, or distances, in doubling numbers of blocks."""
    ranges, start, end = [], 0, block_size
    while start < length:
        ranges.append((start, end))
        start, end = end, 2 * end
    return ranges


def loss_by_block_range(pos_loss: torch.Tensor, pos_count: torch.Tensor, block_size: int,
                        length: int | None = None) -> list[dict[str, Any]]:
    """Mean loss over positions [0, W), [W, 2W), [2W, 4W), ... (the last range cut at `length`,
    default len(pos_loss); positions past pos_loss hold no tokens): a model that uses context
    beyond its window W keeps improving past W."""
    ranges = []
    length = len(pos_loss) if length is None else length
    for start, end in block_ranges(block_size, length):
        stop = min(end, length)
        count = float(pos_count[start:stop].sum())
        ranges.append({"start": start, "end": stop, "tokens": int(count),
                       "loss": float(pos_loss[start:stop].sum() / max(1.0, count))})
    return ranges


def evaluate_checkpoint(path: str | Path, data: str | None = None, lengths: list[int] | None = None,
                        split: str = "test", max_tokens: int | None = 200_000,
                        batch_tokens: int = 8192, device: str = "auto",
                        cache_dir: str | Path | None = None, precision: str = "auto"
                        ) -> dict[str, Any]:
    """Evaluate the checkpoint at `path` on `split` of corpus `data` at each of `lengths`
    (default: the training length). Top-level metrics are those at the training length when it
    is among `lengths`, else at the first length.

    When every length divides the longest, all lengths score the same target tokens: windows of
    the longest length spread evenly over the split (about `max_tokens` tokens), each cut into
    windows of the shorter lengths, so differences between lengths come from the context alone
    (`aligned` in the result). Otherwise each length takes its own evenly spread windows. `data`
    defaults to the corpus the run was trained on. A model
    that carries memory across windows (Transformer-XL) reads whole documents in order instead."""
    dev = resolve_device(device)
    model, tokenizer, checkpoint = load_with_checkpoint(path, dev)
    trained = checkpoint.train_state.get("train_config", {})
    if data is None:  # the corpus the run trained on
        data = trained.get("data")
        if data is None:
            raise ValueError(f"{path} does not record its training corpus; pass --data")
    train_len = trained.get("seq_len") or model.config.max_seq_len
    lengths = lengths or [train_len]
    for length in lengths:
        if length < 1:
            raise ValueError(f"evaluation length {length} must be >= 1")
    corpus = resolve_corpus(data)
    tokens = tokenize_split(corpus, tokenizer, split, Path(cache_dir) if cache_dir else default_cache_dir())
    byte_lengths = tokenizer.token_byte_lengths()
    # a model is scored carrying what it carried in training (reading documents in order if so)
    carry = trained.get("carry_memory", True)
    aligned = (not carry_for(model.config, carry).continues_documents
               and all(max(lengths) % n == 0 for n in lengths))
    if aligned:
        windows = tiled_windows(tokens, lengths, tokenizer.pad_id, max_tokens)
    else:  # each length's own windows, spread over the split
        windows = {n: (PackedSequences(tokens, n, tokenizer.pad_id), None) for n in lengths}
    per_length = {}
    for length in lengths:
        dataset, indices = windows[length]
        per_length[str(length)] = evaluate_length(model, dataset, byte_lengths, max_tokens,
                                                  batch_tokens, dev, indices, carry, precision)
    main = per_length[str(train_len)] if str(train_len) in per_length else per_length[str(lengths[0])]
    return {"checkpoint": str(checkpoint.path), "step": checkpoint.step, "data": data, "split": split,
            "training_length": train_len, "perplexity": main["perplexity"],
            "bits_per_byte": main["bits_per_byte"], "loss": main["loss"], "tokens": main["tokens"],
            "aligned": aligned, "precision": precision, "lengths": per_length}


def plot_loss_by_position(result: dict[str, Any], path: str | Path) -> Path:
    """Loss against position for every evaluated length, as a PNG (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'blockstate[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4))
    for length, metrics in result["lengths"].items():
        bins = metrics["loss_by_position"]
        ax.plot([(b["start"] + b["end"]) / 2 for b in bins], [b["loss"] for b in bins],
                label=f"L={length} (ppl {metrics['perplexity']:.2f})")
    ax.set_xscale("symlog")
    ax.set_xlabel("position in sequence")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{Path(result['checkpoint']).name} on {result['data']} ({result['split']})")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
