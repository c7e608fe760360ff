"""Loading a trained model: `blockstate.load(run_dir_or_checkpoint)`."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .config import ModelConfig
from .model import BlockStateLM
from .ssm.skip import SKIP_STATE_KEY, set_skip_thresholds


def load_model(path: str | Path | Checkpoint, device: torch.device | str = "cpu", **overrides):
    """(model in eval mode, checkpoint) from a run directory (its newest intact checkpoint), a
    checkpoint step directory, or a `Checkpoint` already loaded (to read its configuration
    first without verifying the files twice), with no tokenizer needed (e.g. the task suite's
    runs, whose tokens are synthetic). `overrides` replace fields of the saved configuration that
    do not change the weights (such as `max_seq_len`, to evaluate longer sequences)."""
    checkpoint = path if isinstance(path, Checkpoint) else load_checkpoint(path)
    return _model(checkpoint, device, overrides), checkpoint


def _model(checkpoint: Checkpoint, device, overrides=None) -> BlockStateLM:
    model = BlockStateLM(ModelConfig.from_dict(checkpoint.model_config).with_overrides(
        **(overrides or {})))
    checkpoint.load_model(model)
    if checkpoint.train_state.get(SKIP_STATE_KEY):  # a model trained with filler skipped
        set_skip_thresholds(model, checkpoint.train_state[SKIP_STATE_KEY], str(checkpoint.path))
    return model.to(device).eval()


def load_with_checkpoint(path: str | Path, device: torch.device | str = "cpu"):
    """(model in eval mode, tokenizer, checkpoint) from a run directory (its newest intact
    checkpoint) or a checkpoint step directory. Weights are read from safetensors; nothing is
    unpickled."""
    from .data import load_tokenizer

    checkpoint: Checkpoint = load_checkpoint(path)
    if checkpoint.tokenizer_dir is None:
        raise CheckpointError(f"checkpoint {checkpoint.path} carries no tokenizer; "
                              f"blockstate.loading.load_model loads the model alone")
    tokenizer = load_tokenizer(checkpoint.tokenizer_dir)
    # checked before the model is built: with a mismatched vocab_size in the saved config, the
    # weights would fail to load with a less useful message
    vocab = ModelConfig.from_dict(checkpoint.model_config).vocab_size
    if tokenizer.vocab_size != vocab:
        raise CheckpointError(
            f"tokenizer mismatch in {checkpoint.path}: the tokenizer has {tokenizer.vocab_size} "
            f"tokens but the model was built for vocab_size={vocab}")
    return _model(checkpoint, device), tokenizer, checkpoint


def load(path: str | Path, device: torch.device | str = "cpu"):
    """(model in eval mode, tokenizer) of a trained run: a run directory (its newest intact
    checkpoint), a checkpoint step directory, or a directory written by `save_pretrained` /
    `blockstate export` (its tokenizer is None when it was saved without one).

        model, tokenizer = blockstate.load("runs/my-run")
        ids = model.generate([tokenizer.encode("def ")], 50, temperature=0)[0]
        print(tokenizer.decode(ids))
    """
    from .pretrained import (
        is_pretrained_dir,
        load_pretrained_tokenizer,
        looks_like_repo_id,
        resolve_pretrained,
    )

    if looks_like_repo_id(path):
        try:
            path = resolve_pretrained(path)
        except CheckpointError:
            pass            # neither: the checkpoint loader below names the missing directory
    if is_pretrained_dir(path):
        return BlockStateLM.from_pretrained(path, device), load_pretrained_tokenizer(path)
    model, tokenizer, _ = load_with_checkpoint(path, device)
    return model, tokenizer


__all__ = ["load", "load_with_checkpoint"]
