"""Tokenizers: raw UTF-8 bytes, or SentencePiece (BPE or unigram) trained on a corpus's train split.

Both encode text without adding specials, decode ids back to exactly the text, and report how many
UTF-8 bytes each token stands for, so that a loss in nats per token converts to bits per byte.
A tokenizer is saved as tokenizer.json (plus tokenizer.model for SentencePiece); its fingerprint
is the hash of those files.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from ..fileio import atomic_write
from .corpora import Corpus, CorpusError

TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"
MODEL_TYPES = ("bpe", "unigram")
KINDS = ("byte", "sentencepiece", "bpe", "unigram")
DEFAULT_MAX_CHARS = 20_000_000      # characters of the train split a SentencePiece model is trained on

_SPACE_MARKER = "\u2581"            # SentencePiece's stand-in for " "
_SENTENCE_CHARS = 2048              # longer lines are cut for training (SentencePiece skips long sentences)
_TRAINER_THREADS = 4                # fixed: the count is stored in the model, and EM sums depend on it
_TRAINER_OPTIONS: dict[str, Any] = {
    # Exact round trip: no normalization, no whitespace clean-up, no dummy prefix, bytes for anything
    # outside the vocabulary. Newline and tab are single pieces; runs of spaces may be pieces.
    "normalization_rule_name": "identity", "remove_extra_whitespaces": False, "add_dummy_prefix": False,
    "byte_fallback": True, "allow_whitespace_only_pieces": True, "user_defined_symbols": ["\n", "\t"],
    "character_coverage": 0.9995, "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3,
    "input_sentence_size": 0, "shuffle_input_sentence": False, "max_sentence_length": 4 * _SENTENCE_CHARS,
    "num_threads": _TRAINER_THREADS, "minloglevel": 2,
}


class TokenizerError(ValueError):
    """A tokenizer cannot be built, trained, loaded or applied as asked."""


def _ids(ids: Iterable[int], vocab_size: int) -> np.ndarray:
    """`ids` (a sequence, array or tensor on any device) as a checked (n,) int64 array."""
    array = np.asarray(ids.tolist() if hasattr(ids, "tolist") else list(ids), dtype=np.int64).reshape(-1)
    outside = array[(array < 0) | (array >= vocab_size)]
    if outside.size:
        raise TokenizerError(f"token id {int(outside[0])} is outside the vocabulary [0, {vocab_size})")
    return array


def _check_model_type(model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise TokenizerError(f"model_type={model_type!r} is not valid; allowed values: "
                             f"{', '.join(MODEL_TYPES)}")


def _json_bytes(config: dict[str, Any]) -> bytes:
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


class Tokenizer(abc.ABC):
    """Text to ids and back; ids `pad_id`, `bos_id` and `eos_id` are specials never produced by `encode`."""

    kind: str
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """The ids of `text`, without specials."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, skipping specials; invalid UTF-8 becomes U+FFFD."""

    @abc.abstractmethod
    def token_byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int64: UTF-8 bytes each token stands for, 0 for specials."""

    @abc.abstractmethod
    def _files(self) -> dict[str, bytes]:
        """The files `save` writes, by name, tokenizer.json last."""

    def save(self, directory: str | Path, config_name: str = TOKENIZER_FILE) -> None:
        """Write tokenizer.json (and the SentencePiece model) into `directory`, each file atomically;
        `config_name` renames tokenizer.json (exported models: blockstate_tokenizer.json, beside
        the `tokenizers` library's tokenizer.json)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, content in self._files().items():
            atomic_write(directory / (config_name if name == TOKENIZER_FILE else name), content)

    def fingerprint(self) -> str:
        """sha256 hex of the files `save` writes."""
        digest = hashlib.sha256()
        for name, content in sorted(self._files().items()):
            digest.update(f"{name}\0{len(content)}\0".encode())
            digest.update(content)
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0-255 are bytes, then pad 256, bos 257, eos 258."""

    kind = "byte"
    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        array = _ids(ids, self.vocab_size)
        return array[array < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        lengths[:256] = 1
        return lengths

    def _files(self) -> dict[str, bytes]:
        config = {"kind": self.kind, "vocab_size": self.vocab_size, "pad_id": self.pad_id,
                  "bos_id": self.bos_id, "eos_id": self.eos_id}
        return {TOKENIZER_FILE: _json_bytes(config)}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with identity normalization and byte fallback, so decode(encode(t)) == t.

    SentencePiece reads U+2581 as a space; a literal U+2581 in the text is therefore encoded as its
    three byte pieces, which decode to it. `training` records how the model was trained.
    """

    kind = "sentencepiece"

    def __init__(self, model: bytes, model_type: str, training: dict[str, Any] | None = None):
        _check_model_type(model_type)
        try:
            self._processor = spm.SentencePieceProcessor(model_proto=model)
        except RuntimeError as error:
            raise TokenizerError(f"not a SentencePiece model ({error})") from None
        self.model = model
        self.model_type = model_type
        self.training = training or {}
        processor = self._processor
        self.vocab_size = processor.get_piece_size()
        self.pad_id, self.bos_id, self.eos_id = processor.pad_id(), processor.bos_id(), processor.eos_id()
        byte_ids = [processor.piece_to_id(f"<0x{byte:02X}>") for byte in range(256)]
        if min(self.pad_id, self.bos_id, self.eos_id) < 0 or not all(processor.is_byte(i) for i in byte_ids):
            raise TokenizerError("the SentencePiece model lacks byte fallback or pad/bos/eos pieces; "
                                 "train it with train_sentencepiece")
        self._marker_ids = [byte_ids[byte] for byte in _SPACE_MARKER.encode()]
        self._special_ids = np.array([i for i in range(self.vocab_size)
                                      if processor.is_control(i) or processor.is_unknown(i)], dtype=np.int64)

    def piece(self, index: int) -> str:
        """The SentencePiece piece of token `index` (e.g. for a `transformers` vocabulary)."""
        return self._processor.id_to_piece(index)

    def encode(self, text: str) -> list[int]:
        if _SPACE_MARKER not in text:
            return self._processor.encode(text)
        ids: list[int] = []
        for index, part in enumerate(text.split(_SPACE_MARKER)):
            if index:
                ids += self._marker_ids
            ids += self._processor.encode(part)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        array = _ids(ids, self.vocab_size)
        return self._processor.decode(array[~np.isin(array, self._special_ids)].tolist())

    def token_byte_lengths(self) -> np.ndarray:
        processor = self._processor
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if processor.is_byte(i):
                lengths[i] = 1
            elif not (processor.is_control(i) or processor.is_unknown(i) or processor.is_unused(i)):
                lengths[i] = len(processor.id_to_piece(i).replace(_SPACE_MARKER, " ").encode("utf-8"))
        return lengths

    def _files(self) -> dict[str, bytes]:
        config = {"kind": self.kind, "model_type": self.model_type, "model_file": SENTENCEPIECE_FILE,
                  "vocab_size": self.vocab_size, "pad_id": self.pad_id, "bos_id": self.bos_id,
                  "eos_id": self.eos_id, "training": self.training}
        return {SENTENCEPIECE_FILE: self.model, TOKENIZER_FILE: _json_bytes(config)}


def _training_sentences(corpus: Corpus, max_chars: int, used: list[int]) -> Iterator[str]:
    """Non-empty lines of the train split, cut to at most _SENTENCE_CHARS, until `max_chars` are used."""
    for doc in corpus.documents("train"):
        for chunk in doc.read_chunks():
            for line in chunk.split("\n"):
                for start in range(0, len(line), _SENTENCE_CHARS):
                    sentence = line[start:start + _SENTENCE_CHARS]
                    yield sentence
                    used[0] += len(sentence)
                    if used[0] >= max_chars:
                        return


def _training_record(corpus: Corpus, vocab_size: int, model_type: str, max_chars: int) -> dict[str, Any]:
    return {"corpus": corpus.name, "corpus_fingerprint": corpus.fingerprint(), "model_type": model_type,
            "vocab_size": vocab_size, "max_chars": max_chars}


def train_sentencepiece(corpus: Corpus, vocab_size: int, directory: str | Path, model_type: str = "bpe",
                        max_chars: int = DEFAULT_MAX_CHARS) -> SentencePieceTokenizer:
    """Train a SentencePiece model on the first `max_chars` characters of the corpus's train split
    (documents in corpus order), deterministically, and save it into `directory`."""
    _check_model_type(model_type)
    if not isinstance(vocab_size, int) or vocab_size <= 262:
        raise TokenizerError(f"vocab_size={vocab_size!r} is not valid; a SentencePiece vocabulary holds 256 "
                             "byte pieces, 4 specials, newline and tab, so it must be an integer > 262")
    if not isinstance(max_chars, int) or max_chars < 1:
        raise TokenizerError(f"max_chars={max_chars!r} is not valid; it must be an integer >= 1")
    if next(corpus.documents("train"), None) is None:
        raise CorpusError(f"corpus {corpus.name!r} has no documents in split 'train' to train a tokenizer on")
    used = [0]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=_training_sentences(corpus, max_chars, used),
                                       model_writer=model, vocab_size=vocab_size, model_type=model_type,
                                       **_TRAINER_OPTIONS)
    except RuntimeError as error:
        raise TokenizerError(f"SentencePiece training on corpus {corpus.name!r} with vocab_size={vocab_size} "
                             f"failed: {error}") from None
    training = {**_training_record(corpus, vocab_size, model_type, max_chars), "train_chars": used[0]}
    tokenizer = SentencePieceTokenizer(model.getvalue(), model_type, training)
    tokenizer.save(directory)
    return tokenizer


def load_tokenizer(directory: str | Path, config_name: str = TOKENIZER_FILE) -> Tokenizer:
    """The tokenizer saved in `directory` (by `Tokenizer.save`, with the same `config_name`)."""
    path = Path(directory) / config_name
    if not path.is_file():
        raise TokenizerError(f"no tokenizer in {directory}: {config_name} is missing; build one with "
                             "build_tokenizer or save one with Tokenizer.save")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path} is corrupt ({error}); delete it and build the tokenizer again"
                             ) from None
    kind = config.get("kind") if isinstance(config, dict) else None
    tokenizer: Tokenizer
    if kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind == "sentencepiece":
        model_path = Path(directory) / str(config.get("model_file", SENTENCEPIECE_FILE))
        if not model_path.is_file():
            raise TokenizerError(f"{path} names the SentencePiece model {model_path}, which is missing; "
                                 "build the tokenizer again")
        tokenizer = SentencePieceTokenizer(model_path.read_bytes(), config.get("model_type", "bpe"),
                                           config.get("training"))
    else:
        raise TokenizerError(f"{path}: unknown tokenizer kind {kind!r}; known kinds: byte, sentencepiece")
    if config.get("vocab_size") != tokenizer.vocab_size:
        raise TokenizerError(f"{path} says vocab_size={config.get('vocab_size')!r} but the tokenizer has "
                             f"{tokenizer.vocab_size}; build the tokenizer again")
    return tokenizer


def build_tokenizer(kind: str, corpus: Corpus | None = None, vocab_size: int | None = None,
                    directory: str | Path | None = None) -> Tokenizer:
    """A "byte" tokenizer, or a SentencePiece one ("sentencepiece" or "bpe": BPE; "unigram") trained on
    `corpus` and saved into `directory`. A SentencePiece tokenizer already in `directory`, trained
    with the same settings on the same corpus fingerprint, is loaded instead of trained again.

    The byte tokenizer has a fixed vocabulary of 259 and needs no corpus, so it ignores `corpus` and
    `vocab_size` (a training config can pass its SentencePiece size whatever the kind).
    """
    if kind == "byte":
        tokenizer = ByteTokenizer()
        if directory is not None:
            tokenizer.save(directory)
        return tokenizer
    if kind not in KINDS:
        raise TokenizerError(f"tokenizer kind {kind!r} is not valid; allowed values: {', '.join(KINDS)}")
    needed = (("corpus", corpus), ("vocab_size", vocab_size), ("directory", directory))
    missing = [name for name, value in needed if value is None]
    if missing:
        raise TokenizerError(f"a {kind!r} tokenizer is trained on a corpus; pass {', '.join(missing)}")
    model_type = "unigram" if kind == "unigram" else "bpe"
    if (Path(directory) / TOKENIZER_FILE).is_file():
        saved = load_tokenizer(directory)
        wanted = _training_record(corpus, vocab_size, model_type, DEFAULT_MAX_CHARS)
        if isinstance(saved, SentencePieceTokenizer) \
                and all(saved.training.get(key) == value for key, value in wanted.items()):
            return saved
    return train_sentencepiece(corpus, vocab_size, directory, model_type)
