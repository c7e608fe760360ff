"""Corpora: named collections of text documents with a deterministic train/validation/test split.

Documents are assigned to splits by a stable hash of their name (`split_of`), never by position
inside a document: whole books, papers and files, like the paper's PG19, arXiv and GitHub sets.
Text is streamed in line-aligned chunks, so files larger than memory are never read whole; bytes
that are not UTF-8 are replaced.
Registered corpora stand in for the paper's data: "books" for PG19, "latex" for arXiv and
"python-stdlib" for GitHub code; "kjv" is a small book corpus that Debian packages.
"""

from __future__ import annotations

import codecs
import fnmatch
import gzip
import hashlib
import json
import os
import platform
import re
import stat
import struct
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, BinaryIO

from ..fileio import sha256_file

SPLITS = ("train", "validation", "test")
SNIFF_BYTES = 8192          # a file with a NUL byte in its first 8 KiB is binary
_READ_BYTES = 1 << 20
_UTF8_CONTINUATION = bytes(range(0x80, 0xC0))


class CorpusError(ValueError):
    """A corpus is missing, empty or malformed, or was asked for something it does not have."""


def _check_fractions(validation: float, test: float) -> None:
    if not (0 <= validation <= 1 and 0 <= test <= 1 and validation + test < 1):
        raise CorpusError(f"split fractions validation={validation!r}, test={test!r} are not valid; "
                          "each must be in [0, 1] and their sum below 1")


def split_of(name: str, validation: float = 0.05, test: float = 0.05) -> str:
    """The split of the document called `name`: the same on every machine and Python version.

    u = (first 8 bytes of sha256(name), big-endian) / 2**64; "test" if u < test, "validation" if
    u < test + validation, else "train".
    """
    _check_fractions(validation, test)
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test:
        return "test"
    if u < test + validation:
        return "validation"
    return "train"


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise CorpusError(f"split {split!r} is not valid; allowed values: {', '.join(SPLITS)} "
                          "(or None for all)")


@dataclass(frozen=True)
class Document:
    """A document of a corpus: a stable `name` and its text, held (`str`) or in a file (`Path`).

    A file is read from byte `start` to `end` (None: its end); a `.gz` file is read decompressed.
    Bytes that are not UTF-8 decode to U+FFFD and never raise.
    """

    name: str
    source: str | Path
    start: int = 0
    end: int | None = None

    def read_chunks(self, chunk_chars: int = 1 << 22) -> Iterator[str]:
        """The text in pieces of about `chunk_chars` characters, cut after a newline where there is one."""
        if not isinstance(chunk_chars, int) or chunk_chars < 1:
            raise ValueError(f"chunk_chars={chunk_chars!r} is not valid; it must be an integer >= 1")
        if isinstance(self.source, str):
            yield from _text_chunks(self.source, chunk_chars)
        else:
            yield from _file_chunks(self, chunk_chars)

    @property
    def text(self) -> str:
        """The whole text, for small documents."""
        return "".join(self.read_chunks())


def _text_chunks(text: str, chunk_chars: int) -> Iterator[str]:
    position = 0
    while position < len(text):
        stop = position + chunk_chars
        if stop < len(text):
            newline = text.rfind("\n", position, stop)
            if newline >= position:
                stop = newline + 1
        yield text[position:stop]
        position = stop


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _file_blocks(doc: Document, block_bytes: int) -> Iterator[bytes]:
    """Raw bytes of a file-backed document, in blocks of at most `block_bytes`."""
    path = Path(doc.source)
    try:
        with _open_binary(path) as file:
            if doc.start:
                file.seek(doc.start)
            remaining = None if doc.end is None else doc.end - doc.start
            while remaining is None or remaining > 0:
                block = file.read(block_bytes if remaining is None else min(block_bytes, remaining))
                if not block:
                    return
                if remaining is not None:
                    remaining -= len(block)
                yield block
    except OSError as error:
        raise CorpusError(f"document {doc.name!r}: cannot read {path} ({error}); check that the file "
                          "is readable and not corrupt") from error


def _file_chunks(doc: Document, chunk_chars: int) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = b""
    for block in _file_blocks(doc, chunk_chars):
        pending += block
        cut = pending.rfind(b"\n") + 1
        if not cut:
            if len(pending) < chunk_chars:
                continue
            cut = len(pending)    # a line longer than a chunk: the decoder keeps characters whole
        text = decoder.decode(pending[:cut])
        pending = pending[cut:]
        if text:
            yield text
    text = decoder.decode(pending, final=True)
    if text:
        yield text


def _measure(doc: Document) -> tuple[int, bool]:
    """(UTF-8 bytes of the decoded text, whether the stored bytes were valid UTF-8)."""
    if isinstance(doc.source, str):
        return len(doc.source.encode("utf-8")), True
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    n_bytes = 0
    try:
        for block in _file_blocks(doc, _READ_BYTES):
            decoder.decode(block)
            n_bytes += len(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return sum(len(chunk.encode("utf-8")) for chunk in doc.read_chunks()), False
    return n_bytes, True


class Corpus:
    """A named collection of documents, split into train, validation and test by `split_of`.

    Subclasses yield their non-empty documents in a deterministic order (`_iter_documents`) and
    say which files (`_source_stats`) and settings (`_settings`) determine their content.
    """

    name: str
    description: str

    def __init__(self, name: str, description: str, validation: float = 0.05, test: float = 0.05):
        _check_fractions(validation, test)
        self.name = name
        self.description = description
        self.validation = validation
        self.test = test
        self._metadata: tuple[str, dict[str, Any]] | None = None   # (fingerprint, metadata)

    def _iter_documents(self) -> Iterator[Document]:
        raise NotImplementedError

    def _source_stats(self) -> Iterator[tuple[str, int, int]]:
        """(relative name, size, mtime_ns) of every source file, in a fixed order."""
        raise NotImplementedError

    def _source_files(self) -> Iterator[tuple[str, Path]] | None:
        """(relative name, path) of every source file, in a fixed order, whose content the
        fingerprint hashes; None when the sources are not local files (their `_source_stats`
        then identify them)."""
        return None

    def _settings(self) -> dict[str, Any]:
        """Constructor settings that change the documents, for the fingerprint."""
        return {}

    def _extra_metadata(self) -> dict[str, Any]:
        return {}

    def split_of(self, name: str) -> str:
        """The split of the document called `name` under this corpus's fractions."""
        return split_of(name, self.validation, self.test)

    def documents(self, split: str | None = None) -> Iterator[Document]:
        """The non-empty documents of `split` (None: all), in a deterministic order."""
        _check_split(split)
        for doc in self._iter_documents():
            if split is None or self.split_of(doc.name) == split:
                yield doc

    def fingerprint(self) -> str:
        """sha256 hex of the settings, the split fractions and the sources: the name and content
        of every local source file (an edit that keeps a file's size and modification time
        changes it), else what `_source_stats` says of them."""
        files = self._source_files()
        if files is None:
            return self.stats_fingerprint()
        digest = self._header_digest()
        digest.update(b"content\n")
        for name, path in files:
            digest.update(f"{name}\0{_content_sha256(path)}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()

    def stats_fingerprint(self) -> str:
        """sha256 hex of the sources' names, sizes and mtimes, the settings and the split fractions
        (the fingerprint of runs recorded before `fingerprint` read the content)."""
        digest = self._header_digest()
        for name, size, mtime_ns in self._source_stats():
            digest.update(f"{name}\0{size}\0{mtime_ns}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()

    def _header_digest(self):
        digest = hashlib.sha256()
        header = {"corpus": type(self).__name__, "name": self.name, "settings": self._settings(),
                  "validation": self.validation, "test": self.test}
        digest.update(json.dumps(header, sort_keys=True).encode())
        return digest

    def metadata(self) -> dict[str, Any]:
        """Documents and UTF-8 bytes per split and the number of documents whose stored bytes are not
        valid UTF-8 (decoded with replacement). Reads every document once per fingerprint."""
        fingerprint = self.fingerprint()
        if self._metadata is None or self._metadata[0] != fingerprint:
            documents = dict.fromkeys(SPLITS, 0)
            n_bytes = dict.fromkeys(SPLITS, 0)
            invalid = 0
            for doc in self.documents():
                split = self.split_of(doc.name)
                size, valid = _measure(doc)
                documents[split] += 1
                n_bytes[split] += size
                invalid += not valid
            metadata = {"name": self.name, "description": self.description, "fingerprint": fingerprint,
                        "fingerprint_kind": "stats" if self._source_files() is None else "content",
                        "split_fractions": {"validation": self.validation, "test": self.test},
                        "documents": documents, "bytes": n_bytes, "invalid_utf8_documents": invalid,
                        **self._extra_metadata()}
            self._metadata = (fingerprint, metadata)
        return json.loads(json.dumps(self._metadata[1]))    # a copy the caller may change

    def stat(self) -> tuple[int | None, int | None]:
        """A quick (documents, bytes) estimate that does not read the text; None where unknown."""
        return None, None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


_CONTENT_HASHES: dict[tuple, str] = {}


def _content_sha256(path: Path) -> str:
    """sha256 hex of a file's bytes, remembered per process while its size, mtime and ctime stay
    (ctime changes with every write and cannot be set back, unlike mtime)."""
    status = os.stat(path)
    key = (str(path), status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
    if key not in _CONTENT_HASHES:
        try:
            _CONTENT_HASHES[key] = sha256_file(path, _READ_BYTES)
        except OSError as error:
            raise CorpusError(f"cannot read {path} ({error}); check that the file is readable"
                              ) from error
    return _CONTENT_HASHES[key]


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _pattern_tuple(patterns: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return (patterns,) if isinstance(patterns, str) else tuple(patterns)


def _sniff(path: Path) -> bytes | None:
    """The first 8 KiB of a file's text (decompressed for .gz), or None if it cannot be read."""
    try:
        with _open_binary(path) as file:
            return file.read(SNIFF_BYTES)
    except OSError:
        return None


def _text_size(path: Path, size: int) -> int:
    """Bytes of a file's content: its size, or for .gz the size its trailer records (mod 2**32)."""
    if not path.name.endswith(".gz"):
        return size
    with open(path, "rb") as file:
        file.seek(-4, os.SEEK_END)
        return struct.unpack("<I", file.read(4))[0]


class DirectoryCorpus(Corpus):
    """One document per text file under `root`, named by its POSIX path relative to `root`.

    A file is used when it is regular, not hidden nor under a hidden directory, matches one of
    `patterns` (default: any; matched against the file name and the relative path) and none of
    `exclude` (matched against each path component and the relative path), and is not empty or
    binary (a NUL byte in its first 8 KiB). `.gz` files are read decompressed.
    """

    def __init__(self, root: str | Path, patterns: str | tuple[str, ...] | list[str] | None = None,
                 exclude: str | tuple[str, ...] | list[str] = (), *, name: str | None = None,
                 description: str | None = None, validation: float = 0.05, test: float = 0.05):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise CorpusError(f"corpus directory {str(root)!r} does not exist or is not a directory; "
                              "pass a directory of text files")
        self.patterns = None if patterns is None else _pattern_tuple(patterns)
        self.exclude = _pattern_tuple(exclude)
        super().__init__(name or self.root.resolve().name, description or f"text files under {self.root}",
                         validation, test)
        if next(self._iter_documents(), None) is None:
            raise CorpusError(f"corpus {self.name!r} has no documents: no non-empty text file under "
                              f"{self.root} matches patterns={self.patterns} exclude={self.exclude}; "
                              "add files or change the patterns")

    def _candidates(self) -> list[tuple[str, Path, os.stat_result]]:
        """(relative name, path, stat) of the files selected by name, sorted by relative name."""
        found = []
        for directory, subdirectories, filenames in os.walk(self.root):
            subdirectories[:] = [name for name in subdirectories
                                 if not name.startswith(".") and not _matches(name, self.exclude)]
            for filename in filenames:
                path = Path(directory, filename)
                relative = path.relative_to(self.root).as_posix()
                if filename.startswith(".") or _matches(filename, self.exclude) \
                        or _matches(relative, self.exclude):
                    continue
                if self.patterns is not None and not (_matches(filename, self.patterns)
                                                      or _matches(relative, self.patterns)):
                    continue
                try:
                    status = path.stat()
                except OSError:     # a broken symbolic link
                    continue
                if stat.S_ISREG(status.st_mode):
                    found.append((relative, path, status))
        return sorted(found, key=lambda item: item[0])

    def _text_files(self) -> Iterator[tuple[str, Path, os.stat_result]]:
        for relative, path, status in self._candidates():
            if status.st_size == 0:
                continue
            head = _sniff(path)
            if head and b"\0" not in head:
                yield relative, path, status

    def _iter_documents(self) -> Iterator[Document]:
        for relative, path, _ in self._text_files():
            yield Document(relative, path)

    def _source_stats(self) -> Iterator[tuple[str, int, int]]:
        for relative, _, status in self._candidates():
            yield relative, status.st_size, status.st_mtime_ns

    def _source_files(self) -> Iterator[tuple[str, Path]]:
        return ((relative, path) for relative, path, _ in self._candidates())

    def _settings(self) -> dict[str, Any]:
        return {"patterns": self.patterns, "exclude": self.exclude}

    def _extra_metadata(self) -> dict[str, Any]:
        return {"root": str(self.root)}

    def stat(self) -> tuple[int | None, int | None]:
        files = [(path, status.st_size) for _, path, status in self._text_files()]
        return len(files), sum(_text_size(path, size) for path, size in files)


class StdlibCorpus(DirectoryCorpus):
    """Every *.py file of the running interpreter's standard library (a GitHub-code analogue).

    Names are paths relative to the stdlib root; site-packages, dist-packages and __pycache__
    are excluded. The content depends on the Python version, which the metadata records.
    """

    def __init__(self, *, validation: float = 0.05, test: float = 0.05):
        super().__init__(Path(sysconfig.get_paths()["stdlib"]), patterns=("*.py",),
                         exclude=("site-packages", "dist-packages", "__pycache__"), name="python-stdlib",
                         description=REGISTRY_DESCRIPTIONS["python-stdlib"], validation=validation, test=test)

    def _extra_metadata(self) -> dict[str, Any]:
        return {"root": str(self.root), "python_version": platform.python_version(),
                "python_implementation": platform.python_implementation()}


class JsonlCorpus(Corpus):
    """One document per line of a JSON Lines file: the string field `text_field` of each object.

    Documents are named by the `id_field` value when given, else "{filename}:{line_number}"
    (1-based), and come in file order. Blank lines are ignored.
    """

    def __init__(self, path: str | Path, text_field: str = "text", id_field: str | None = None, *,
                 name: str | None = None, validation: float = 0.05, test: float = 0.05):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise CorpusError(f"JSON Lines file {str(path)!r} does not exist; pass an existing .jsonl file")
        self.text_field = text_field
        self.id_field = id_field
        super().__init__(name or self.path.name, f"JSON Lines documents of {self.path}", validation, test)

    def _iter_documents(self) -> Iterator[Document]:
        with open(self.path, "rb") as file:
            for number, raw in enumerate(file, start=1):
                line = raw.decode("utf-8", errors="replace").strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise CorpusError(f"{self.path}:{number}: invalid JSON ({error.msg}); each line must be "
                                      "one JSON object") from None
                text = record.get(self.text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise CorpusError(f"{self.path}:{number}: no string field {self.text_field!r}; pass "
                                      "text_field= naming the field that holds the text")
                if self.id_field is None:
                    name = f"{self.path.name}:{number}"
                elif record.get(self.id_field) is None:
                    raise CorpusError(f"{self.path}:{number}: no field {self.id_field!r} to name the "
                                      "document; pass id_field=None to name documents by line number")
                else:
                    name = str(record[self.id_field])
                if text:
                    # JSON escapes can hold lone surrogates, which have no UTF-8 encoding.
                    yield Document(name, text.encode("utf-8", "replace").decode("utf-8"))

    def _source_stats(self) -> Iterator[tuple[str, int, int]]:
        status = self.path.stat()
        yield self.path.name, status.st_size, status.st_mtime_ns

    def _source_files(self) -> Iterator[tuple[str, Path]]:
        return iter([(self.path.name, self.path)])

    def _settings(self) -> dict[str, Any]:
        return {"text_field": self.text_field, "id_field": self.id_field}

    def _extra_metadata(self) -> dict[str, Any]:
        return {"path": str(self.path)}


class TextFileCorpus(Corpus):
    """A single large text file cut into segments named "{filename}#{index}" that act as documents.

    A segment ends at the first line end after `segment_chars` characters (inside a longer line,
    at a character boundary), so the file can be split like a collection of documents. Finding
    the cuts streams the file once; they are remembered while the file is unchanged.
    """

    def __init__(self, path: str | Path, segment_chars: int = 1_000_000, *, name: str | None = None,
                 validation: float = 0.05, test: float = 0.05):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise CorpusError(f"text file {str(path)!r} does not exist; pass an existing text file")
        if not isinstance(segment_chars, int) or segment_chars < 1:
            raise CorpusError(f"segment_chars={segment_chars!r} is not valid; it must be an integer >= 1")
        self.segment_chars = segment_chars
        self._cuts: tuple[tuple[int, int], list[int]] | None = None    # ((size, mtime_ns), byte offsets)
        super().__init__(name or self.path.name, f"segments of the text file {self.path}", validation, test)
        if self.path.stat().st_size == 0:
            raise CorpusError(f"corpus {self.name!r} has no documents: {self.path} is empty")

    def _segment_offsets(self) -> list[int]:
        status = self.path.stat()
        version = (status.st_size, status.st_mtime_ns)
        if self._cuts is None or self._cuts[0] != version:
            offsets, position, chars = [0], 0, 0
            with open(self.path, "rb") as file:
                while line := file.readline(_READ_BYTES):
                    position += len(line)
                    chars += len(line.translate(None, _UTF8_CONTINUATION))
                    if chars >= self.segment_chars and (line.endswith(b"\n") or line[-1] < 0x80):
                        offsets.append(position)
                        chars = 0
            if offsets[-1] != position:
                offsets.append(position)
            self._cuts = (version, offsets)
        return self._cuts[1]

    def _iter_documents(self) -> Iterator[Document]:
        for index, (start, end) in enumerate(pairwise(self._segment_offsets())):
            yield Document(f"{self.path.name}#{index}", self.path, start, end)

    def _source_stats(self) -> Iterator[tuple[str, int, int]]:
        status = self.path.stat()
        yield self.path.name, status.st_size, status.st_mtime_ns

    def _source_files(self) -> Iterator[tuple[str, Path]]:
        return iter([(self.path.name, self.path)])

    def _settings(self) -> dict[str, Any]:
        return {"segment_chars": self.segment_chars}

    def _extra_metadata(self) -> dict[str, Any]:
        return {"path": str(self.path), "segment_chars": self.segment_chars}

    def stat(self) -> tuple[int | None, int | None]:
        return None, self.path.stat().st_size


def unlzw(body: bytes, max_bits: int) -> bytes:
    """Decode the body of a Unix `compress` (.Z) stream in block mode (after its 3-byte header).

    Codes are 9 to `max_bits` bits wide, packed least significant bit first; code 256 clears the
    table; whenever the width changes, the rest of the current group of eight codes is padding.
    """
    table = [bytes([byte]) for byte in range(256)] + [b""]     # entry 256 is the clear code
    n_bits, mask = 9, (1 << 9) - 1
    total_bits = 8 * len(body)
    data = body + b"\0\0\0"                # a code is read as 3 bytes from its first byte
    position = group_start = 0
    previous = b""
    out = bytearray()
    while position + n_bits <= total_bits:
        if len(table) > mask and n_bits < max_bits:     # the next code is one bit wider
            group = 8 * n_bits
            position = group_start + -(-(position - group_start) // group) * group
            group_start = position
            n_bits, mask = n_bits + 1, (1 << (n_bits + 1)) - 1
            continue
        code = (int.from_bytes(data[position >> 3:(position >> 3) + 3], "little") >> (position & 7)) & mask
        position += n_bits
        if code == 256:
            group = 8 * n_bits
            position = group_start + -(-(position - group_start) // group) * group
            group_start = position
            n_bits, mask = 9, (1 << 9) - 1
            del table[257:]
            previous = b""
            continue
        if code < len(table):
            entry = table[code]
            if previous and len(table) < 1 << max_bits:
                table.append(previous + entry[:1])
        elif code == len(table) and previous:
            entry = previous + previous[:1]
            table.append(entry)
        else:
            raise ValueError(f"corrupt LZW data: code {code} at bit {position - n_bits} "
                             f"with {len(table)} entries")
        out += entry
        previous = entry
    return bytes(out)


KJV_DATA = Path("/usr/lib/bible.data")
_KJV_MAGIC = b"EC02"
_KJV_TABLE = 0x54            # after the magic and its padded description: block size, block count, offsets
_KJV_VERSE = re.compile(r"(\d?[A-Za-z]+)(\d+):(\d+) (.*)")
_kjv_cache: dict[tuple[str, int, int], list[tuple[str, str]]] = {}


def _read_kjv(path: Path) -> list[tuple[str, str]]:
    """(name, text) of each book of a bible-kjv data file: compressed blocks of lines "Ge1:1 text"."""
    status = path.stat()
    key = (str(path), status.st_size, status.st_mtime_ns)
    if key not in _kjv_cache:
        data = path.read_bytes()
        try:
            if not data.startswith(_KJV_MAGIC):
                raise ValueError("no EC02 header")
            _, n_blocks = struct.unpack_from(">II", data, _KJV_TABLE)
            offsets = struct.unpack_from(f">{n_blocks + 1}I", data, _KJV_TABLE + 8)
            header = data[offsets[0] - 3:offsets[0]]
            if header[:2] != b"\x1f\x9d" or not header[2] & 0x80:
                raise ValueError("no block-mode compress header before the first block")
            text = b"".join(unlzw(data[a:b], header[2] & 0x1F) for a, b in pairwise(offsets))
        except (ValueError, struct.error) as error:
            raise CorpusError(f"{path} is not a readable bible-kjv data file ({error}); reinstall it with: "
                              "apt-get install --reinstall bible-kjv-text") from None
        books: dict[str, list[str]] = {}
        lines = text.decode("utf-8", errors="replace").split("\n")
        for number, line in enumerate(lines[1:], start=2):    # line 1 is the title
            match = _KJV_VERSE.fullmatch(line)
            if match is None:
                if line:
                    raise CorpusError(f"{path}: line {number} is not a verse ({line[:40]!r}); "
                                      "expected 'Ge1:1 text'")
                continue
            books.setdefault(match[1], []).append(match[4])
        _kjv_cache[key] = [(f"{index:02d}_{book}", "\n".join(verses) + "\n")
                           for index, (book, verses) in enumerate(books.items(), start=1)]
    return _kjv_cache[key]


class KjvCorpus(Corpus):
    """The King James Bible of Debian's bible-kjv-text (/usr/lib/bible.data): one document per book,
    named "01_Ge" to "66_Rev", one verse per line with the verse references removed."""

    def __init__(self, path: str | Path = KJV_DATA, *, validation: float = 0.05, test: float = 0.05):
        self.path = Path(path)
        if not self.path.is_file():
            raise CorpusError(f"corpus 'kjv' is not installed ({self.path} is missing); install it with: "
                              f"{REGISTRY_HINTS['kjv']}")
        super().__init__("kjv", REGISTRY_DESCRIPTIONS["kjv"], validation, test)

    def _iter_documents(self) -> Iterator[Document]:
        for name, text in _read_kjv(self.path):
            yield Document(name, text)

    def _source_stats(self) -> Iterator[tuple[str, int, int]]:
        status = self.path.stat()
        yield self.path.name, status.st_size, status.st_mtime_ns

    def _source_files(self) -> Iterator[tuple[str, Path]]:
        return iter([(self.path.name, self.path)])

    def _extra_metadata(self) -> dict[str, Any]:
        return {"path": str(self.path), "package": "bible-kjv-text"}

    def stat(self) -> tuple[int | None, int | None]:
        books = _read_kjv(self.path)
        return len(books), sum(len(text.encode("utf-8")) for _, text in books)


TEXLIVE_DOC = Path("/usr/share/doc/texlive-doc")


class LatexCorpus(DirectoryCorpus):
    """LaTeX sources (.tex and Debian's .tex.gz) under /usr/share/doc/texlive-doc, an arXiv analogue.

    Debian's texlive-science-doc puts about 270 mathematics and science documents there; other
    texlive-*-doc packages, when installed, add theirs (the fingerprint tells the sets apart).
    """

    def __init__(self, root: str | Path = TEXLIVE_DOC, *, validation: float = 0.05, test: float = 0.05):
        root = Path(root)
        if not root.is_dir():
            raise CorpusError(f"corpus 'latex' is not installed ({root} is missing); install it with: "
                              f"{REGISTRY_HINTS['latex']}")
        super().__init__(root, patterns=("*.tex", "*.tex.gz"), name="latex",
                         description=REGISTRY_DESCRIPTIONS["latex"], validation=validation, test=test)


# Published split names of Hugging Face datasets -> this library's splits.
HF_SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation",
                  "dev": "validation", "test": "test"}


class HfCorpus(Corpus):
    """A Hugging Face dataset (optional `datasets` package), loaded from the local cache when
    HF_DATASETS_OFFLINE=1. Row i of published split s becomes the document "{s}/{i:09d}".

    The dataset's own splits are kept: its train, validation (or "valid", "dev") and test rows are
    this corpus's train, validation and test. A split the dataset does not publish is carved out
    of its train rows by the usual name hash (e.g. validation and test for a train-only dataset);
    other published splits (e.g. "unsupervised") count as train rows. `text_field` names the text
    column. With `streaming`, rows are read as they are tokenized and never downloaded whole; the
    fingerprint then follows the dataset's name and settings only, and no per-split counts are
    computed ahead of tokenization.
    """

    def __init__(self, dataset: str, config: str | None = None, text_field: str = "text",
                 streaming: bool = False):
        label = f"hf:{dataset}" + (f":{config}" if config else "")
        try:
            import datasets
        except ImportError:
            raise CorpusError(f"corpus {label!r} needs the optional package 'datasets'; install it with: "
                              "pip install 'blockstate[hf]'") from None
        try:
            self._splits = datasets.load_dataset(dataset, config, streaming=streaming)
        except Exception as error:  # network, cache and format failures all land here
            raise CorpusError(f"corpus {label!r} could not be loaded ({type(error).__name__}: {error}); "
                              "when offline (HF_DATASETS_OFFLINE=1) it must already be in the local cache"
                              ) from None
        for split, rows in self._splits.items():
            columns = rows.column_names
            if columns is not None and text_field not in columns:
                raise CorpusError(f"corpus {label!r}: split {split!r} has no column {text_field!r}; "
                                  f"columns: {', '.join(columns)} (choose one with text=COLUMN)")
        self.dataset, self.config, self.text_field = dataset, config, text_field
        self.streaming = streaming
        published = {HF_SPLIT_NAMES.get(name, "train") for name in self._splits}
        # the fractions carved out of the train rows: only for splits the dataset lacks
        super().__init__(label, f"Hugging Face dataset {dataset}" + (f" ({config})" if config else ""),
                         validation=0.0 if "validation" in published else 0.05,
                         test=0.0 if "test" in published else 0.05)

    def split_of(self, name: str) -> str:
        published = HF_SPLIT_NAMES.get(name.partition("/")[0], "train")
        return published if published != "train" else split_of(name, self.validation, self.test)

    def documents(self, split: str | None = None) -> Iterator[Document]:
        """As `Corpus.documents`, reading only the published splits that can hold `split`."""
        _check_split(split)
        for published in sorted(self._splits):
            mapped = HF_SPLIT_NAMES.get(published, "train")
            if split is not None and mapped != split and mapped != "train":
                continue
            for index, row in enumerate(self._splits[published]):
                text = row.get(self.text_field)
                if text is None and self.text_field not in row:
                    raise CorpusError(f"corpus {self.name!r}: split {published!r} has no column "
                                      f"{self.text_field!r}; columns: {', '.join(row)} (choose one "
                                      f"with text=COLUMN)")
                if not isinstance(text, str):
                    raise CorpusError(f"corpus {self.name!r}: row {index} of split {published!r} has "
                                      f"a {type(text).__name__} in column {self.text_field!r}, not text")
                name = f"{published}/{index:09d}"
                if text and (split is None or self.split_of(name) == split):
                    yield Document(name, text)

    def _iter_documents(self) -> Iterator[Document]:
        return self.documents()

    def _source_stats(self) -> Iterator[tuple[str, int, int]]:
        for split in sorted(self._splits):
            if self.streaming:
                yield f"{split}:streaming", 0, 0
            else:
                yield f"{split}:{self._splits[split]._fingerprint}", len(self._splits[split]), 0

    def _settings(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "config": self.config, "text_field": self.text_field,
                "splits": "published"}

    def metadata(self) -> dict[str, Any]:
        if not self.streaming:
            return super().metadata()
        return {"name": self.name, "description": self.description, "fingerprint": self.fingerprint(),
                "split_fractions": {"validation": self.validation, "test": self.test},
                "documents": None, "bytes": None, "streaming": True}


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[3]     # src/blockstate/data/corpora.py


def _books_candidates() -> list[Path]:
    """Where the books may be: $BLOCKSTATE_BOOKS_DIR, then ../shared/data/books next to the repository,
    then ../shared/data/books from the working directory."""
    books = Path("shared", "data", "books")
    candidates = [_repo_root().parent / books, Path.cwd() / ".." / books]
    configured = os.environ.get("BLOCKSTATE_BOOKS_DIR")
    return [Path(configured), *candidates] if configured else candidates


def _books_dir() -> Path | None:
    return next((path for path in _books_candidates() if path.is_dir()), None)


def _existing(path: Path) -> Callable[[], Path | None]:
    return lambda: path if path.exists() else None


@dataclass(frozen=True)
class _Registered:
    locate: Callable[[], Path | None]      # where the corpus lives, or None when it is not there
    build: Callable[[Path], Corpus]


REGISTRY_DESCRIPTIONS = {
    "python-stdlib": "Python standard library source of this interpreter (a GitHub-code analogue)",
    "books": "public-domain books, one document per file (a PG19 analogue; ../shared/data/books)",
    "kjv": "King James Bible, one document per book (Debian package bible-kjv-text)",
    "latex": "LaTeX sources of TeX Live documentation (an arXiv-math analogue; Debian texlive-science-doc)",
}
REGISTRY_HINTS = {
    "python-stdlib": None,
    "books": "set BLOCKSTATE_BOOKS_DIR to a directory of text files",
    "kjv": "apt-get install bible-kjv-text",
    "latex": "apt-get install texlive-science-doc",
}
REGISTRY: dict[str, _Registered] = {
    "python-stdlib": _Registered(lambda: Path(sysconfig.get_paths()["stdlib"]), lambda _: StdlibCorpus()),
    "books": _Registered(_books_dir, lambda root: DirectoryCorpus(root, name="books",
                                                                  description=REGISTRY_DESCRIPTIONS["books"])),
    "kjv": _Registered(_existing(KJV_DATA), KjvCorpus),
    "latex": _Registered(_existing(TEXLIVE_DOC), LatexCorpus),
}


def _unavailable(name: str) -> CorpusError:
    if name == "books":
        looked = ", ".join(str(path) for path in _books_candidates())
        return CorpusError(f"corpus 'books' is not available: no directory at {looked}; "
                           f"{REGISTRY_HINTS['books']}")
    return CorpusError(f"corpus {name!r} is not installed; install it with: {REGISTRY_HINTS[name]}")


def _hf_corpus(spec: str) -> HfCorpus:
    """hf:NAME[:CONFIG][,text=COLUMN][,streaming] -> HfCorpus."""
    name, *options = spec[3:].split(",")
    dataset, _, config = name.partition(":")
    if not dataset:
        raise CorpusError(f"corpus {spec!r} names no dataset; use hf:NAME or hf:NAME:CONFIG")
    settings: dict[str, Any] = {}
    for option in options:
        key, eq, value = option.partition("=")
        if key == "text" and eq and value:
            settings["text_field"] = value
        elif key == "streaming" and not eq:
            settings["streaming"] = True
        else:
            raise CorpusError(f"corpus {spec!r}: option {option!r} is not valid; use "
                              f"hf:NAME[:CONFIG][,text=COLUMN][,streaming]")
    return HfCorpus(dataset, config or None, **settings)


def resolve_corpus(spec: str) -> Corpus:
    """A corpus from a registered name, "hf:NAME[:CONFIG][,text=COLUMN][,streaming]", or a path: a directory
    (DirectoryCorpus), a *.jsonl file (JsonlCorpus) or another file (TextFileCorpus)."""
    if spec in REGISTRY:
        location = REGISTRY[spec].locate()
        if location is None:
            raise _unavailable(spec)
        return REGISTRY[spec].build(location)
    if spec.startswith("hf:"):
        return _hf_corpus(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return DirectoryCorpus(path)
    if path.is_file():
        return JsonlCorpus(path) if path.suffix == ".jsonl" else TextFileCorpus(path)
    raise CorpusError(f"unknown corpus {spec!r}: not a registered corpus ({', '.join(REGISTRY)}), "
                      "not hf:NAME[:CONFIG], and not an existing file or directory")


def list_corpora() -> list[dict[str, Any]]:
    """For each registered corpus: name, description, available, documents, bytes, location and
    hint (what to do when it is unavailable). Stats files and reads no text, except that "kjv"
    is decompressed (under a second, once per process)."""
    rows = []
    for name, entry in REGISTRY.items():
        location = entry.locate()
        row = {"name": name, "description": REGISTRY_DESCRIPTIONS[name], "available": False,
               "documents": None, "bytes": None, "location": None if location is None else str(location),
               "hint": REGISTRY_HINTS[name]}
        if location is not None:
            try:
                documents, n_bytes = entry.build(location).stat()
            except CorpusError:
                pass
            else:
                row.update(available=True, documents=documents, bytes=n_bytes, hint=None)
        rows.append(row)
    return rows
