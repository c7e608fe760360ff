"""Tokenized splits cached on disk, fixed-length training windows over them, and a resumable stream
of batches of windows.

A split is tokenized once into a flat binary file of ids (each document as [bos] + ids + [eos]) in a
cache directory keyed by the corpus and tokenizer fingerprints; training reads it memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import shutil
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from ..fileio import sha256_file
from .corpora import SPLITS, Corpus, CorpusError
from .tokenizers import Tokenizer

FORMAT_VERSION = 2  # 2: the manifest records the sha256 of the token and offset files
IGNORE_INDEX = -100                 # target of padded positions (torch's cross-entropy default)
MANIFEST_FILE = "manifest.json"
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "doc_offsets.npy"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


@dataclass
class TokenizedSplit:
    """The token stream of one split: document d is tokens[doc_offsets[d]:doc_offsets[d + 1]], which
    holds [bos] + encode(text) + [eos]. `n_bytes` counts the UTF-8 bytes of the split's text."""

    tokens: np.memmap            # (n_tokens,) uint16 or uint32, read-only
    doc_offsets: np.ndarray      # (n_docs + 1,) int64
    n_bytes: int
    manifest: dict[str, Any]
    path: Path

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def split_cache_key(corpus: Corpus, tokenizer: Tokenizer, split: str) -> str:
    """sha256 hex of (corpus fingerprint, tokenizer fingerprint, split, format version)."""
    key = {"corpus": corpus.fingerprint(), "tokenizer": tokenizer.fingerprint(), "split": split,
           "format_version": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _load_split(directory: Path, key: str) -> TokenizedSplit:
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorpusError(f"cache directory {directory} has a corrupt manifest ({error}); delete it"
                          ) from None
    if manifest.get("key") != key or manifest.get("format_version") != FORMAT_VERSION:
        raise CorpusError(f"cache directory {directory} holds another tokenization "
                          f"(key {manifest.get('key')!r}); delete it")
    for name in (TOKENS_FILE, OFFSETS_FILE):  # a file changed in place (same size) is caught here
        if _file_sha256(directory / name) != manifest.get("files_sha256", {}).get(name):
            raise _CorruptCache(f"token cache {directory}: {name} does not match the sha256 its "
                                f"manifest records", directory)
    tokens = np.memmap(directory / TOKENS_FILE, dtype=np.dtype(manifest["dtype"]), mode="r")
    doc_offsets = np.load(directory / OFFSETS_FILE)
    if len(tokens) != manifest["n_tokens"] or doc_offsets[-1] != manifest["n_tokens"]:
        raise CorpusError(f"cache directory {directory} is corrupt ({len(tokens)} tokens, manifest says "
                          f"{manifest['n_tokens']}); delete it")
    return TokenizedSplit(tokens, doc_offsets, manifest["n_bytes"], manifest, directory)


class _CorruptCache(CorpusError):
    """A cached split whose files no longer match its manifest: rebuilt by `tokenize_split`."""

    def __init__(self, message: str, directory: Path):
        super().__init__(message)
        self.directory = directory


def _file_sha256(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def _write_split(corpus: Corpus, tokenizer: Tokenizer, split: str, directory: Path, key: str) -> None:
    """Stream the split's documents, chunk by chunk, into the files of `directory`."""
    dtype = token_dtype(tokenizer.vocab_size)
    bos = np.array([tokenizer.bos_id], dtype=dtype).tobytes()
    eos = np.array([tokenizer.eos_id], dtype=dtype).tobytes()
    offsets = array("q", [0])
    content = hashlib.sha256()      # of the text, documents separated by 0xFF (never in UTF-8)
    n_tokens = n_bytes = 0
    documents = tqdm(corpus.documents(split), desc=f"tokenizing {corpus.name}/{split}", unit=" docs",
                     disable=None, leave=False)
    with open(directory / TOKENS_FILE, "wb") as file:
        for doc in documents:
            file.write(bos)
            n_tokens += 1
            for chunk in doc.read_chunks():
                text = chunk.encode("utf-8")
                content.update(text)
                n_bytes += len(text)
                ids = np.asarray(tokenizer.encode(chunk), dtype=dtype)      # (chunk tokens,)
                file.write(ids.tobytes())
                n_tokens += len(ids)
            file.write(eos)
            n_tokens += 1
            content.update(b"\xff")
            offsets.append(n_tokens)
    if len(offsets) == 1:
        raise CorpusError(f"corpus {corpus.name!r} has no documents in split {split!r}")
    np.save(directory / OFFSETS_FILE, np.frombuffer(offsets, dtype=np.int64))
    manifest = {"format_version": FORMAT_VERSION, "key": key, "corpus": corpus.name, "split": split,
                "corpus_fingerprint": corpus.fingerprint(), "tokenizer_fingerprint": tokenizer.fingerprint(),
                "tokenizer_kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                "content_sha256": content.hexdigest(), "n_tokens": n_tokens, "n_docs": len(offsets) - 1,
                "n_bytes": n_bytes, "dtype": dtype.name, "corpus_metadata": corpus.metadata(),
                "files_sha256": {name: _file_sha256(directory / name)
                                 for name in (TOKENS_FILE, OFFSETS_FILE)}}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def tokenize_split(corpus: Corpus, tokenizer: Tokenizer, split: str, cache_dir: str | Path,
                   warn: Any = None) -> TokenizedSplit:
    """The tokenized `split` of `corpus`, from the cache under `cache_dir` or written there first.

    The cache directory is keyed by `split_cache_key`, so a changed source file or tokenizer gives a
    new one; it is written to a temporary directory and renamed into place, so readers never see a
    partial split. Documents are streamed: the split is never held in memory. A cached split whose
    files no longer match the sha256 in its manifest is rebuilt (`warn(message)` is told; by
    default the message goes to stderr).
    """
    try:
        return _tokenize_split(corpus, tokenizer, split, cache_dir)
    except _CorruptCache as error:
        (warn or _stderr)(f"warning: {error}; rebuilding it")
        _discard_cache(error.directory)
        return _tokenize_split(corpus, tokenizer, split, cache_dir)


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


def _discard_cache(directory: Path) -> None:
    """Move a corrupt cached split out of the way in one rename (a concurrent reader sees the old
    directory or none), then remove it."""
    trash = directory.with_name(f".{directory.name}.corrupt-{os.getpid()}")
    try:
        os.rename(directory, trash)
    except OSError:
        return  # another process moved it first
    shutil.rmtree(trash, ignore_errors=True)


def _tokenize_split(corpus: Corpus, tokenizer: Tokenizer, split: str, cache_dir: str | Path
                    ) -> TokenizedSplit:
    if split not in SPLITS:
        raise CorpusError(f"split {split!r} is not valid; allowed values: {', '.join(SPLITS)}")
    key = split_cache_key(corpus, tokenizer, split)
    cache_dir = Path(cache_dir)
    final = cache_dir / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', corpus.name)}-{split}-{key[:16]}"
    if not (final / MANIFEST_FILE).is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
        try:
            _write_split(corpus, tokenizer, split, temporary, key)
            if final.exists() and not (final / MANIFEST_FILE).is_file():
                shutil.rmtree(final)        # left incomplete by hand: renames never leave one
            try:
                os.rename(temporary, final)
            except OSError:
                if not (final / MANIFEST_FILE).is_file():   # else another process wrote it first
                    raise
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    return _load_split(final, key)


def _window_index(bounds: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of every window: a span of n tokens gives ceil((n - 1) / seq_len) windows
    starting every seq_len tokens, each ending at the end of its span."""
    lengths = np.diff(bounds)                                       # (n_spans,)
    counts = (lengths - 1 + seq_len - 1) // seq_len                 # (n_spans,) windows per span
    span = np.repeat(np.arange(len(lengths)), counts)               # (n_windows,)
    first = np.cumsum(counts) - counts                              # (n_spans,) a span's first window
    rank = np.arange(len(span)) - np.repeat(first, counts)          # (n_windows,) window number in its span
    return bounds[:-1][span] + rank * seq_len, bounds[1:][span]


class PackedSequences:
    """Fixed-length training windows of a tokenized split.

    A window is seq_len + 1 tokens (inputs = window[:-1], targets = window[1:]); consecutive windows
    of a document overlap by one token, so every token but a document's first is a target exactly
    once. A window never crosses a document boundary: the last one of a document is right-padded
    (inputs with `pad_id`, targets with -100). With `pack_documents` the whole stream is cut into
    windows regardless of boundaries (only the stream's last window is padded).
    """

    def __init__(self, split: TokenizedSplit, seq_len: int, pad_id: int, pack_documents: bool = False):
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r} is not valid; it must be an integer >= 1")
        self.split = split
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.pack_documents = pack_documents
        bounds = np.array([0, split.n_tokens]) if pack_documents else np.asarray(split.doc_offsets, np.int64)
        self.starts, self.ends = _window_index(bounds, seq_len)     # (n_windows,) each

    def __len__(self) -> int:
        return len(self.starts)

    def _windows(self, indices: Any, trim: bool = False) -> tuple[np.ndarray, np.ndarray]:
        index = np.asarray(indices, dtype=np.int64).reshape(-1)                        # (B,)
        outside = index[(index < 0) | (index >= len(self))]
        if outside.size:
            raise IndexError(f"window {int(outside[0])} is out of range for {len(self)} windows")
        width = self.seq_len + 1
        if trim and index.size:  # only the columns that hold tokens of one of these windows
            width = min(width, int((self.ends[index] - self.starts[index]).max()))
        positions = self.starts[index, None] + np.arange(width)                        # (B, width)
        valid = positions < self.ends[index, None]                                     # (B, seq_len + 1)
        tokens = self.split.tokens[np.minimum(positions, self.split.n_tokens - 1)].astype(np.int64)
        inputs = np.where(valid[:, :-1], tokens[:, :-1], self.pad_id)                  # (B, seq_len)
        targets = np.where(valid[:, 1:], tokens[:, 1:], IGNORE_INDEX)                  # (B, seq_len)
        return inputs, targets

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of window i, each (seq_len,) int64."""
        i = operator.index(i)
        inputs, targets = self._windows([i + len(self) if i < 0 else i])
        return inputs[0], targets[0]

    def batch(self, indices: Any, trim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the windows `indices`, each a (B, seq_len) LongTensor; with `trim`,
        (B, n) where n <= seq_len is the longest of these windows (evaluation at lengths far
        beyond every document then allocates only what the documents hold)."""
        inputs, targets = self._windows(indices, trim)
        return torch.from_numpy(inputs), torch.from_numpy(targets)


class _Batchable(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor]: ...


class BatchStream:
    """An endless, deterministic, resumable stream of batches of a dataset's windows for one rank.

    Epoch e visits every window once, in the order torch.randperm(len(dataset)) seeded with
    seed + e. A global batch is the next `global_batch_size` windows of that order (an epoch's
    incomplete tail is skipped), and rank r takes its r-th contiguous slice of
    global_batch_size // world_size windows. The state is (epoch, windows of the epoch consumed).
    """

    def __init__(self, dataset: _Batchable, global_batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        for name, value in (("global_batch_size", global_batch_size), ("world_size", world_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not valid; it must be an integer >= 1")
        if global_batch_size % world_size:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                             f"world_size={world_size}; use a multiple of the number of processes")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r} is not valid; it must be in [0, {world_size})")
        if len(dataset) < global_batch_size:
            raise CorpusError(f"the dataset has {len(dataset)} windows, fewer than one global batch of "
                              f"{global_batch_size}; use more data, a shorter seq_len or a smaller batch")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = global_batch_size // world_size
        self.epoch = 0
        self.position = 0
        self._order: tuple[int, np.ndarray] | None = None          # (epoch, its permutation)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch_size

    def _permutation(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = (self.epoch, torch.randperm(len(self.dataset), generator=generator).numpy())
        return self._order[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets) of the next global batch, each (local batch, seq_len)."""
        if self.position + self.global_batch_size > len(self.dataset):
            self.epoch += 1
            self.position = 0
        start = self.position + self.rank * self.local_batch_size
        indices = self._permutation()[start:start + self.local_batch_size]
        self.position += self.global_batch_size
        return self.dataset.batch(indices)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the batches that follow are exactly those that followed when `state` was taken."""
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or epoch < 0 or not isinstance(position, int) \
                or not 0 <= position <= len(self.dataset):
            raise ValueError(f"state {state!r} is not valid; expected {{'epoch': int >= 0, "
                             f"'position': int in [0, {len(self.dataset)}]}}")
        self.epoch = epoch
        self.position = position


class SegmentStream:
    """Batches whose rows continue their documents from one batch to the next, for models that
    carry memory across training sequences (Transformer-XL).

    Epoch e deals the documents, in the order torch.randperm(n_docs) seeded with seed + e (or in
    corpus order when `shuffle` is false), into `global_batch_size` lanes of equal numbers of
    windows, each document's windows in order; batch t holds the t-th window of every lane, and
    rank r takes its contiguous slice of lanes. `next_batch` also returns `keep` (B,) bool: true
    where the row continues the document of the lane's previous window. The state is (epoch,
    batches of the epoch consumed).
    """

    def __init__(self, dataset: PackedSequences, global_batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                             f"world_size={world_size}")
        if len(dataset) < global_batch_size:
            raise CorpusError(f"the dataset has {len(dataset)} windows, fewer than one global batch of "
                              f"{global_batch_size}; use more data, a shorter seq_len or a smaller batch")
        self.dataset, self.global_batch_size, self.seed = dataset, global_batch_size, seed
        self.rows = slice(rank * (global_batch_size // world_size),
                          (rank + 1) * (global_batch_size // world_size))
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self.doc_of = np.searchsorted(dataset.split.doc_offsets, dataset.starts, side="right") - 1
        self._lanes: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch_size

    def lanes(self) -> tuple[np.ndarray, np.ndarray]:
        """(window indices, keep), each (global_batch_size, batches_per_epoch), of this epoch."""
        if self._lanes is None or self._lanes[0] != self.epoch:
            n_docs = int(self.doc_of.max()) + 1
            rank_of_doc = np.arange(n_docs)
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + self.epoch)
                rank_of_doc[torch.randperm(n_docs, generator=generator).numpy()] = np.arange(n_docs)
            order = np.lexsort((np.arange(len(self.doc_of)), rank_of_doc[self.doc_of]))
            steps = self.batches_per_epoch
            lanes = order[: steps * self.global_batch_size].reshape(self.global_batch_size, steps)
            docs = self.doc_of[lanes]
            keep = np.zeros_like(lanes, dtype=bool)
            keep[:, 1:] = docs[:, 1:] == docs[:, :-1]
            self._lanes = (self.epoch, lanes, keep)
        return self._lanes[1], self._lanes[2]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets, keep) of the next batch."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        lanes, keep = self.lanes()
        indices, row_keep = lanes[self.rows, self.position], keep[self.rows, self.position]
        self.position += 1
        inputs, targets = self.dataset.batch(indices)
        return inputs, targets, torch.as_tensor(row_keep)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def default_cache_dir() -> Path:
    """Where tokenized corpora are cached: $BLOCKSTATE_CACHE, else ~/.cache/blockstate."""
    return Path(os.environ.get("BLOCKSTATE_CACHE", Path.home() / ".cache" / "blockstate"))
