"""Tests of the data layer: corpora and splits, tokenizers, the tokenized-split cache, packing and the
batch stream. Corpora are built in tmp_path; the shared books are only read, never copied."""

import gzip
import hashlib
import json
import platform
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blockstate.data import (
    IGNORE_INDEX,
    SPLITS,
    BatchStream,
    ByteTokenizer,
    CorpusError,
    DirectoryCorpus,
    Document,
    JsonlCorpus,
    KjvCorpus,
    LatexCorpus,
    PackedSequences,
    SentencePieceTokenizer,
    StdlibCorpus,
    TextFileCorpus,
    TokenizerError,
    build_tokenizer,
    corpora,
    list_corpora,
    load_tokenizer,
    resolve_corpus,
    split_of,
    tokenize_split,
    train_sentencepiece,
)
from blockstate.data.corpora import unlzw

# The books next to the repository (../shared/data/books), where the "books" corpus looks for them;
# a clone elsewhere has none, and the tests that need them are skipped.
SHARED_BOOKS = corpora._books_dir() or Path("/nonexistent/shared/data/books")
HARD_TEXTS = [
    "  leading spaces\n\n\ttabs\tand   runs of spaces  \n",
    "def f(x):\n    return x  # trailing   \r\n",
    "non-ASCII: naïve größe 日本語 🎉 e\u0301 \u00a0nbsp\u3000ideographic space",
    "SentencePiece's own marker \u2581 and \u2581\u2581 in text",
    "\n",
    " ",
    "",
    "control \x00 \x01 \x7f characters",
]


def synthetic_text(rng: random.Random, n_lines: int) -> str:
    """Lines of pseudo-words, indentation and some non-ASCII, enough variety for a ~400-piece vocabulary."""
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "von", "der", "the", "ing", "über", "naï", "語"]
    lines = []
    for _ in range(n_lines):
        words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(rng.randint(1, 10))]
        lines.append("    " * rng.randint(0, 2) + " ".join(words) + rng.choice(["", ".", ",", ":"]))
    return "\n".join(lines) + "\n"


def make_corpus_dir(root: Path, n_docs: int = 30, n_lines: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (root / f"doc{i:03d}.txt").write_text(synthetic_text(rng, rng.randint(1, n_lines)), encoding="utf-8")
    return root


def lzw_compress(data: bytes, max_bits: int = 16) -> bytes:
    """Reference Unix `compress` encoder (block mode, no clear codes): the stream body after its header."""
    table = {bytes([i]): i for i in range(256)}
    next_code, n_bits = 257, 9
    fields: list[tuple[int, int]] = []      # (value, width in bits), least significant bit first
    position = group_start = 0
    word = b""
    for byte in data:
        candidate = word + bytes([byte])
        if candidate in table:
            word = candidate
            continue
        fields.append((table[word], n_bits))
        position += n_bits
        if next_code > (1 << n_bits) - 1 and n_bits < max_bits:     # widen, padding the group of 8 codes
            pad = -(position - group_start) % (8 * n_bits)
            fields.append((0, pad))
            position += pad
            group_start = position
            n_bits += 1
        if next_code < 1 << max_bits:
            table[candidate] = next_code
            next_code += 1
        word = bytes([byte])
    if word:
        fields.append((table[word], n_bits))
    packed, shift = 0, 0
    for value, width in fields:
        packed |= value << shift
        shift += width
    return packed.to_bytes((shift + 7) // 8, "little")


def write_bible_data(path: Path, text: bytes, block_bytes: int = 512) -> None:
    """A bible-kjv data file: header, block table, then compress blocks sharing one 3-byte header."""
    bodies = [lzw_compress(text[i:i + block_bytes]) for i in range(0, len(text), block_bytes)]
    header = b"EC02Compressed Data File".ljust(0x54, b"\0") + struct.pack(">II", block_bytes, len(bodies))
    offsets = [len(header) + 4 * (len(bodies) + 1) + 3]
    for body in bodies:
        offsets.append(offsets[-1] + len(body))
    path.write_bytes(header + struct.pack(f">{len(offsets)}I", *offsets) + b"\x1f\x9d\x90" + b"".join(bodies))


class CountingByteTokenizer(ByteTokenizer):
    """A byte tokenizer that counts encode calls, to see whether a split was tokenized again."""

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return super().encode(text)


@pytest.fixture(scope="module")
def sp_corpus(tmp_path_factory):
    return DirectoryCorpus(make_corpus_dir(tmp_path_factory.mktemp("sp") / "corpus", n_docs=40))


@pytest.fixture(scope="module")
def sp_tokenizer(sp_corpus, tmp_path_factory):
    return train_sentencepiece(sp_corpus, 400, tmp_path_factory.mktemp("sp-tokenizer"))


# Splits and corpora

def test_split_of_matches_its_definition_and_fractions():
    names = [f"document-{i}" for i in range(20_000)]
    for name in names[:200]:
        u = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
        assert split_of(name) == ("test" if u < 0.05 else "validation" if u < 0.10 else "train")
    counts = {split: 0 for split in SPLITS}
    for name in names:
        counts[split_of(name, validation=0.1, test=0.2)] += 1
    assert abs(counts["test"] / len(names) - 0.2) < 0.01
    assert abs(counts["validation"] / len(names) - 0.1) < 0.01
    # pinned: the split of a name must not change between versions, machines or Python builds
    pinned = {"kjv_01_Ge.txt": ("train", "train"), "asyncio/tasks.py": ("train", "test"),
              "pg19/1234.txt": ("train", "validation"), "d": ("validation", "test")}
    for name, (default, wide) in pinned.items():
        assert split_of(name) == default and split_of(name, validation=0.3, test=0.3) == wide
    with pytest.raises(CorpusError, match="split fractions"):
        split_of("x", validation=0.6, test=0.5)


def test_stdlib_corpus_covers_all_splits_and_records_python_version():
    corpus = resolve_corpus("python-stdlib")
    assert isinstance(corpus, StdlibCorpus)
    metadata = corpus.metadata()
    assert all(metadata["documents"][split] > 0 for split in SPLITS)
    assert metadata["python_version"] == platform.python_version()
    names = [doc.name for doc in corpus.documents("test")]
    assert names == sorted(names) and all(name.endswith(".py") for name in names)
    assert not any("site-packages" in name or "__pycache__" in name for name in names)
    json.dumps(metadata)


def test_directory_corpus_skips_empty_hidden_binary_and_survives_bad_utf8(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / ".hidden.txt").write_text("hidden\n")
    (tmp_path / ".git" / "config").write_text("hidden too\n")
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 cr\xe8me\n")
    (tmp_path / "sub" / "b.md").write_text("nested ü\n")
    (tmp_path / "sub" / "c.txt.gz").write_bytes(gzip.compress(b"compressed\n"))
    corpus = DirectoryCorpus(tmp_path, validation=0, test=0)
    docs = list(corpus.documents())
    assert [doc.name for doc in docs] == ["a.txt", "latin1.txt", "sub/b.md", "sub/c.txt.gz"]
    texts = {doc.name: doc.text for doc in docs}
    assert texts["latin1.txt"] == "caf\ufffd cr\ufffdme\n"
    assert texts["sub/c.txt.gz"] == "compressed\n"
    metadata = corpus.metadata()
    assert metadata["invalid_utf8_documents"] == 1
    assert metadata["documents"] == {"train": 4, "validation": 0, "test": 0}
    assert metadata["bytes"]["train"] == sum(len(text.encode()) for text in texts.values())
    assert corpus.stat() == (4, 12 + 11 + 10 + 11)
    assert [d.name for d in DirectoryCorpus(tmp_path, patterns="*.txt", exclude="sub").documents()] == \
        ["a.txt", "latin1.txt"]


def test_missing_and_empty_corpora_raise_clear_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        DirectoryCorpus(tmp_path / "nowhere")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="has no documents"):
        DirectoryCorpus(tmp_path)
    with pytest.raises(CorpusError, match="python-stdlib, books, kjv, latex"):
        resolve_corpus("no-such-corpus")
    with pytest.raises(CorpusError, match="does not exist"):
        JsonlCorpus(tmp_path / "missing.jsonl")
    with pytest.raises(CorpusError, match="is empty"):
        TextFileCorpus(tmp_path / "empty.txt")
    with pytest.raises(CorpusError, match="apt-get install bible-kjv-text"):
        KjvCorpus(tmp_path / "bible.data")
    with pytest.raises(CorpusError, match="apt-get install texlive-science-doc"):
        LatexCorpus(tmp_path / "texlive-doc")
    with pytest.raises(CorpusError, match="split 'dev' is not valid"):
        next(StdlibCorpus().documents("dev"))


def test_jsonl_corpus_reads_lines_and_names_bad_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "first\\ndocument", "id": "a"}\n\n{"text": "", "id": "b"}\n'
                    '{"text": "third \\ud800", "id": 7}\n')
    assert [(d.name, d.text) for d in JsonlCorpus(path).documents()] == \
        [("data.jsonl:1", "first\ndocument"), ("data.jsonl:4", "third ?")]
    assert [d.name for d in JsonlCorpus(path, id_field="id").documents()] == ["a", "7"]
    assert isinstance(resolve_corpus(str(path)), JsonlCorpus)
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(CorpusError, match=r"data.jsonl:3: invalid JSON"):
        list(JsonlCorpus(path).documents())
    path.write_text('{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match=r"data.jsonl:1: no string field 'text'"):
        list(JsonlCorpus(path).documents())


def test_text_file_corpus_cuts_segments_at_line_ends(tmp_path):
    path = tmp_path / "big.txt"
    lines = [f"line {i} ü{'x' * (i % 13)}\n" for i in range(300)]
    path.write_text("".join(lines) + "no final newline", encoding="utf-8")
    corpus = TextFileCorpus(path, segment_chars=500)
    assert isinstance(resolve_corpus(str(path)), TextFileCorpus)
    docs = list(corpus.documents())
    assert [doc.name for doc in docs] == [f"big.txt#{i}" for i in range(len(docs))]
    assert len(docs) > 5
    assert "".join(doc.text for doc in docs) == path.read_text(encoding="utf-8")
    assert all(doc.text.endswith("\n") and len(doc.text) >= 500 for doc in docs[:-1])
    one_line = tmp_path / "one-line.txt"
    one_line.write_text("é" * 3000, encoding="utf-8")
    segments = [doc.text for doc in TextFileCorpus(one_line, segment_chars=1000).documents()]
    assert "".join(segments) == "é" * 3000 and "\ufffd" not in "".join(segments)


@pytest.mark.parametrize("chunk_chars", [1, 3, 7, 64])
def test_read_chunks_keeps_characters_and_cuts_after_newlines(tmp_path, chunk_chars):
    text = "short\nlines ünïcödé 日本\n" * 5 + "a line longer than any chunk " * 4 + "\nend"
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    for doc in (Document("held", text), Document("file", path)):
        chunks = list(doc.read_chunks(chunk_chars))
        assert "".join(chunks) == text
        # a chunk ends at a line end, unless it is a piece of a line longer than a chunk
        assert all(chunk.endswith("\n") or "\n" not in chunk for chunk in chunks[:-1])
        if chunk_chars == 64:
            assert sum(not chunk.endswith("\n") for chunk in chunks[:-1]) <= 2


def test_registered_books_resolve_and_report_absence(tmp_path, monkeypatch):
    if SHARED_BOOKS.is_dir():
        books = resolve_corpus("books")
        assert books.name == "books"
        names = [doc.name for doc in books.documents()]
        assert len(names) == len(list(SHARED_BOOKS.glob("*.txt")))
    make_corpus_dir(tmp_path / "my-books", n_docs=3)
    monkeypatch.setenv("BLOCKSTATE_BOOKS_DIR", str(tmp_path / "my-books"))
    names = [doc.name for doc in resolve_corpus("books").documents()]
    assert names == ["doc000.txt", "doc001.txt", "doc002.txt"]
    monkeypatch.setattr(corpora, "_books_candidates", lambda: [tmp_path / "nowhere"])
    with pytest.raises(CorpusError, match="corpus 'books' is not available"):
        resolve_corpus("books")


@pytest.mark.skipif(not SHARED_BOOKS.is_dir(), reason="needs ../shared/data/books next to the repository")
def test_books_corpus_is_the_shared_directory():
    metadata = resolve_corpus("books").metadata()
    assert sum(metadata["documents"].values()) == len(list(SHARED_BOOKS.glob("*.txt")))
    assert Path(metadata["root"]).resolve() == SHARED_BOOKS.resolve()


def test_list_corpora_reports_availability():
    rows = {row["name"]: row for row in list_corpora()}
    assert list(rows) == ["python-stdlib", "books", "kjv", "latex"]
    stdlib = rows["python-stdlib"]
    assert stdlib["available"] and stdlib["documents"] > 100 and stdlib["bytes"] > 10**6
    assert rows["kjv"]["available"] == corpora.KJV_DATA.is_file()
    assert rows["latex"]["available"] == corpora.TEXLIVE_DOC.is_dir()
    for row in rows.values():
        assert set(row) == {"name", "description", "available", "documents", "bytes", "location", "hint"}
        assert row["available"] or row["hint"]
    json.dumps(list(rows.values()))


def test_unlzw_decodes_the_compress_format():
    rng = random.Random(1)
    data = synthetic_text(rng, 400).encode() + b"a" * 3000 + bytes(rng.randrange(256) for _ in range(3000))
    body = lzw_compress(data, max_bits=12)          # past 9, 10, 11 bits, then a full table
    assert unlzw(body, 12) == data
    if shutil.which("gzip"):                        # gzip reads .Z: the reference encoder is the real format
        header = b"\x1f\x9d\x8c"                     # magic, block mode, 12 bits
        decoded = subprocess.run(["gzip", "-dc"], input=header + body, capture_output=True, check=True)
        assert decoded.stdout == data
    with pytest.raises(ValueError, match="corrupt LZW"):
        unlzw(b"\xff\xff\xff\xff", 16)


def test_kjv_corpus_reads_one_document_per_book(tmp_path):
    verses = ["Ge1:1 In the beginning God created the heaven and the earth.",
              "Ge1:2 And the earth was without form, and void.", "Exo1:1 Now these are the names.",
              "1Sm1:1 Now there was a certain man.",
              "Rev22:21 The grace of our Lord Jesus Christ be with you all."]
    text = "Holy Bible, Authorized (King James) Version.\n" + "\n".join(verses * 20) + "\n"
    path = tmp_path / "bible.data"
    write_bible_data(path, text.encode(), block_bytes=256)
    corpus = KjvCorpus(path, validation=0, test=0)
    docs = list(corpus.documents())
    assert [doc.name for doc in docs] == ["01_Ge", "02_Exo", "03_1Sm", "04_Rev"]
    assert docs[0].text.startswith("In the beginning God created the heaven and the earth.\nAnd the earth")
    assert docs[1].text == "Now these are the names.\n" * 20
    assert corpus.metadata()["documents"]["train"] == 4
    path.write_bytes(b"not a bible")
    with pytest.raises(CorpusError, match="not a readable bible-kjv data file"):
        list(KjvCorpus(path).documents())


def test_latex_corpus_reads_tex_and_gzipped_tex(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.tex").write_text("\\begin{equation} e^{i\\pi} + 1 = 0 \\end{equation}\n")
    (tmp_path / "pkg" / "b.tex.gz").write_bytes(gzip.compress(b"$\\int_0^1 x\\,dx = 1/2$\n"))
    (tmp_path / "pkg" / "c.pdf").write_bytes(b"%PDF-1.5 not text\n")
    corpus = LatexCorpus(tmp_path)
    assert corpus.name == "latex"
    assert [doc.name for doc in corpus.documents()] == ["pkg/a.tex", "pkg/b.tex.gz"]
    assert corpus.stat() == (2, len((tmp_path / "pkg" / "a.tex").read_bytes()) + 23)


def test_hf_corpus_without_datasets_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: importing it fails
    with pytest.raises(CorpusError, match=r"pip install 'blockstate\[hf\]'"):
        resolve_corpus("hf:wikitext:wikitext-2-raw-v1")
    with pytest.raises(CorpusError, match="names no dataset"):
        resolve_corpus("hf:")


# Tokenizers

def test_byte_tokenizer_round_trip_save_and_load(tmp_path):
    tokenizer = ByteTokenizer()
    for text in HARD_TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert int(tokenizer.token_byte_lengths()[ids].sum()) == len(text.encode())
    assert tokenizer.decode([tokenizer.bos_id, 104, 105, tokenizer.eos_id, tokenizer.pad_id]) == "hi"
    assert tokenizer.decode([0xE2, 0x96]) == "\ufffd"
    assert tokenizer.decode(torch.tensor([104, 105])) == tokenizer.decode(np.array([104, 105])) == "hi"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenizer.decode([259])
    tokenizer.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ByteTokenizer) and loaded.fingerprint() == tokenizer.fingerprint()
    assert build_tokenizer("byte").vocab_size == 259


def test_sentencepiece_round_trip_and_byte_lengths(sp_tokenizer, sp_corpus):
    assert sp_tokenizer.vocab_size == 400
    lengths = sp_tokenizer.token_byte_lengths()
    assert lengths.shape == (400,)
    assert lengths[[sp_tokenizer.pad_id, sp_tokenizer.bos_id, sp_tokenizer.eos_id]].sum() == 0
    texts = HARD_TEXTS + [doc.text for doc in sp_corpus.documents("validation")]
    for text in texts:
        ids = sp_tokenizer.encode(text)
        assert sp_tokenizer.decode(ids) == text
        assert int(lengths[ids].sum()) == len(text.encode())
        assert not {sp_tokenizer.pad_id, sp_tokenizer.bos_id, sp_tokenizer.eos_id} & set(ids)
    sample = next(sp_corpus.documents("train")).text
    assert len(sp_tokenizer.encode(sample)) < len(sample.encode()) / 2       # it learned pieces
    assert len(sp_tokenizer.encode("\n\n")) == 2                            # newlines are single pieces
    ids = sp_tokenizer.encode("naïve")
    assert sp_tokenizer.decode([sp_tokenizer.bos_id, *ids, sp_tokenizer.eos_id]) == "naïve"


def test_sentencepiece_is_deterministic_and_saves(sp_tokenizer, sp_corpus, tmp_path):
    again = train_sentencepiece(sp_corpus, 400, tmp_path / "again")
    assert again.fingerprint() == sp_tokenizer.fingerprint()
    loaded = load_tokenizer(tmp_path / "again")
    assert isinstance(loaded, SentencePieceTokenizer) and loaded.fingerprint() == sp_tokenizer.fingerprint()
    assert loaded.encode(HARD_TEXTS[2]) == sp_tokenizer.encode(HARD_TEXTS[2])
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["tokenizer.json", "tokenizer.model"]
    unigram = train_sentencepiece(sp_corpus, 320, tmp_path / "unigram", model_type="unigram")
    assert all(unigram.decode(unigram.encode(text)) == text for text in HARD_TEXTS)
    with pytest.raises(TokenizerError, match="model_type='wordpiece' is not valid"):
        train_sentencepiece(sp_corpus, 400, tmp_path / "x", model_type="wordpiece")
    with pytest.raises(TokenizerError, match="vocab_size=100 is not valid"):
        train_sentencepiece(sp_corpus, 100, tmp_path / "x")
    with pytest.raises(TokenizerError, match="Vocabulary size too high"):
        train_sentencepiece(sp_corpus, 50_000, tmp_path / "x")


def test_build_tokenizer_reuses_a_matching_saved_tokenizer(sp_corpus, tmp_path, monkeypatch):
    first = build_tokenizer("bpe", sp_corpus, 400, tmp_path)
    monkeypatch.setattr("blockstate.data.tokenizers.train_sentencepiece",
                        lambda *args: pytest.fail("trained again"))
    assert build_tokenizer("sentencepiece", sp_corpus, 400, tmp_path).fingerprint() == first.fingerprint()
    with pytest.raises(TokenizerError, match="pass corpus, directory"):
        build_tokenizer("unigram", vocab_size=400)
    with pytest.raises(TokenizerError, match="tokenizer kind 'words' is not valid"):
        build_tokenizer("words")
    assert build_tokenizer("byte", sp_corpus, vocab_size=4096, directory=tmp_path / "byte").vocab_size == 259
    assert isinstance(load_tokenizer(tmp_path / "byte"), ByteTokenizer)


def test_load_tokenizer_errors(tmp_path, sp_tokenizer):
    with pytest.raises(TokenizerError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="is corrupt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"kind": "wordpiece"}')
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer(tmp_path)
    sp_tokenizer.save(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.model, which is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path)


# Tokenized splits, packing and batches

@pytest.fixture
def small_split(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i, length in enumerate([1, 5, 8, 9, 17, 30, 3]):
        (root / f"d{i}.txt").write_text("abcdefghijklmnopqrstuvwxyz0123456789"[:length])
    corpus = DirectoryCorpus(root, validation=0, test=0)
    return tokenize_split(corpus, ByteTokenizer(), "train", tmp_path / "cache")


def reference_windows(split, seq_len, pad_id, pack_documents):
    """Slow reference: walk each span token by token."""
    offsets = [0, split.n_tokens] if pack_documents else split.doc_offsets.tolist()
    windows = []
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        span = split.tokens[start:end].tolist()
        for first in range(0, len(span) - 1, seq_len):
            real = span[first:first + seq_len + 1]
            window = real + [pad_id] * (seq_len + 1 - len(real))
            targets = [t if i < len(real) else IGNORE_INDEX for i, t in enumerate(window)][1:]
            windows.append((window[:-1], targets))
    return windows


@pytest.mark.parametrize("pack_documents", [False, True])
@pytest.mark.parametrize("seq_len", [1, 4, 8, 64])
def test_packed_sequences_match_reference(small_split, seq_len, pack_documents):
    tokenizer = ByteTokenizer()
    dataset = PackedSequences(small_split, seq_len, tokenizer.pad_id, pack_documents=pack_documents)
    expected = reference_windows(small_split, seq_len, tokenizer.pad_id, pack_documents)
    assert len(dataset) == len(expected)
    for i, (inputs, targets) in enumerate(expected):
        got_inputs, got_targets = dataset[i]
        assert got_inputs.dtype == np.int64 and got_inputs.shape == (seq_len,)
        assert got_inputs.tolist() == inputs and got_targets.tolist() == targets
    inputs, targets = dataset.batch(torch.arange(len(dataset)))
    assert inputs.dtype == torch.long and inputs.shape == (len(dataset), seq_len)
    assert targets.tolist() == [t for _, t in expected]
    real_targets = targets[targets != IGNORE_INDEX]
    assert len(real_targets) == small_split.n_tokens - (1 if pack_documents else small_split.n_docs)


def test_packed_windows_never_mix_documents(small_split):
    tokenizer = ByteTokenizer()
    dataset = PackedSequences(small_split, 4, tokenizer.pad_id)
    inputs, targets = dataset.batch(np.arange(len(dataset)))
    for row_inputs, row_targets in zip(inputs.tolist(), targets.tolist(), strict=True):
        window = row_inputs[:1] + [t for t in row_targets if t != IGNORE_INDEX]
        bos = [i for i, t in enumerate(window) if t == tokenizer.bos_id]
        eos = [i for i, t in enumerate(window) if t == tokenizer.eos_id]
        assert bos in ([], [0]) and eos in ([], [len(window) - 1])     # bos only first, eos only last
        n_real = len(window) - 1
        assert all(t == IGNORE_INDEX for t in row_targets[n_real:])
        assert all(t == tokenizer.pad_id for t in row_inputs[n_real + 1:])
    packed = PackedSequences(small_split, 4, tokenizer.pad_id, pack_documents=True)
    rows = packed.batch(np.arange(len(packed)))[0].tolist()
    assert any(tokenizer.eos_id in row[:-1] and tokenizer.bos_id in row for row in rows)   # crosses documents
    assert len(packed) < len(dataset)
    with pytest.raises(IndexError, match="out of range"):
        dataset[len(dataset)]
    assert dataset[-1][0].tolist() == dataset[len(dataset) - 1][0].tolist()
    with pytest.raises(ValueError, match="seq_len=0 is not valid"):
        PackedSequences(small_split, 0, tokenizer.pad_id)


def test_tokenize_split_writes_manifest_and_reuses_cache(tmp_path):
    root = make_corpus_dir(tmp_path / "corpus", n_docs=12)
    corpus = DirectoryCorpus(root, validation=0.3, test=0.3)
    tokenizer = CountingByteTokenizer()
    split = tokenize_split(corpus, tokenizer, "train", tmp_path / "cache")
    docs = list(corpus.documents("train"))
    text = "".join(doc.text for doc in docs)
    assert split.tokens.dtype == np.uint16 and split.doc_offsets.dtype == np.int64
    assert split.n_docs == len(docs) and split.n_bytes == len(text.encode())
    assert split.n_tokens == len(text.encode()) + 2 * len(docs)
    first = split.tokens[split.doc_offsets[0]:split.doc_offsets[1]]
    assert first[0] == tokenizer.bos_id and first[-1] == tokenizer.eos_id
    assert bytes(first[1:-1].astype(np.uint8)) == docs[0].text.encode()
    manifest = json.loads((split.path / "manifest.json").read_text())
    content = hashlib.sha256(b"".join(doc.text.encode() + b"\xff" for doc in docs)).hexdigest()
    assert manifest["content_sha256"] == content and manifest["n_tokens"] == split.n_tokens
    assert manifest["corpus_metadata"]["documents"]["train"] == len(docs)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]   # no temporary left

    calls = tokenizer.calls
    again = tokenize_split(corpus, tokenizer, "train", tmp_path / "cache")
    assert tokenizer.calls == calls and again.path == split.path                # reused, not re-tokenized

    (root / docs[0].name).write_text("a changed document, of another length\n")
    changed = tokenize_split(corpus, tokenizer, "train", tmp_path / "cache")
    assert tokenizer.calls > calls and changed.path != split.path
    assert changed.manifest["content_sha256"] != content


def test_tokenize_split_keys_on_tokenizer_and_rejects_empty_split(tmp_path, sp_tokenizer):
    root = make_corpus_dir(tmp_path / "corpus", n_docs=6)
    corpus = DirectoryCorpus(root, validation=0.5, test=0)
    by_bytes = tokenize_split(corpus, ByteTokenizer(), "validation", tmp_path / "cache")
    by_pieces = tokenize_split(corpus, sp_tokenizer, "validation", tmp_path / "cache")
    assert by_pieces.path != by_bytes.path and by_pieces.n_bytes == by_bytes.n_bytes
    assert by_pieces.n_tokens < by_bytes.n_tokens
    lengths = sp_tokenizer.token_byte_lengths()
    assert int(lengths[by_pieces.tokens].sum()) == by_pieces.n_bytes           # bits per byte is exact
    with pytest.raises(CorpusError, match="corpus 'corpus' has no documents in split 'test'"):
        tokenize_split(corpus, ByteTokenizer(), "test", tmp_path / "cache")
    with pytest.raises(CorpusError, match="split 'dev' is not valid"):
        tokenize_split(corpus, ByteTokenizer(), "dev", tmp_path / "cache")


class IndexDataset:
    """Windows that are their own index, to see which windows a batch holds."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def batch(self, indices):
        indices = torch.as_tensor(indices)
        return indices, -indices


def collect(stream, n):
    return [stream.next_batch()[0].tolist() for _ in range(n)]


def test_batch_stream_is_deterministic_and_covers_each_epoch():
    stream = BatchStream(IndexDataset(23), global_batch_size=5, seed=3)
    batches = collect(stream, 8)
    assert batches == collect(BatchStream(IndexDataset(23), 5, seed=3), 8)
    assert batches != collect(BatchStream(IndexDataset(23), 5, seed=4), 8)
    first_epoch = sum(batches[:4], [])
    assert len(set(first_epoch)) == 20                       # 4 full batches, the tail of 3 skipped
    def order(seed):
        return torch.randperm(23, generator=torch.Generator().manual_seed(seed))[:20].tolist()

    assert first_epoch == order(3) and sum(batches[4:], []) == order(4)
    assert stream.state_dict() == {"epoch": 1, "position": 20}


def test_batch_stream_resumes_mid_epoch():
    stream = BatchStream(IndexDataset(23), 5, seed=0)
    collect(stream, 6)
    state = stream.state_dict()
    expected = collect(stream, 7)                            # crosses into epoch 2
    resumed = BatchStream(IndexDataset(23), 5, seed=0)
    resumed.load_state_dict(state)
    assert collect(resumed, 7) == expected
    with pytest.raises(ValueError, match="is not valid"):
        resumed.load_state_dict({"epoch": 0})


def test_batch_stream_ranks_split_the_global_batch(small_split):
    single = collect(BatchStream(IndexDataset(50), 6, seed=1), 12)
    ranks = [collect(BatchStream(IndexDataset(50), 6, seed=1, rank=r, world_size=3), 12) for r in range(3)]
    for step, batch in enumerate(single):
        assert sum((ranks[r][step] for r in range(3)), []) == batch
    dataset = PackedSequences(small_split, 4, ByteTokenizer().pad_id)
    inputs, targets = BatchStream(dataset, 4, seed=0, rank=1, world_size=2).next_batch()
    assert inputs.shape == targets.shape == (2, 4) and inputs.dtype == torch.long
    with pytest.raises(ValueError, match="not divisible by world_size=4"):
        BatchStream(IndexDataset(50), 6, seed=0, world_size=4)
    with pytest.raises(CorpusError, match="fewer than one global batch"):
        BatchStream(IndexDataset(5), 6, seed=0)


def _hf_local(directory, splits, column="content"):
    """A local dataset directory in the layout `datasets.load_dataset(path)` reads: one JSON lines
    file per published split."""
    directory.mkdir()
    rows = {}
    for split, count in splits.items():
        rows[split] = [f"{split} document {i}: " + "text " * (i % 5 + 1) for i in range(count)]
        with open(directory / f"{split}.jsonl", "w") as file:
            for i, text in enumerate(rows[split]):
                file.write(json.dumps({column: text, "id": i}) + "\n")
    return rows


def test_hf_corpus_keeps_the_published_splits_and_reads_the_named_column(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = _hf_local(tmp_path / "ds", {"train": 30, "validation": 6, "test": 7})
    corpus = resolve_corpus(f"hf:{tmp_path / 'ds'},text=content")
    for split in SPLITS:
        docs = list(corpus.documents(split))
        assert [d.text for d in docs] == rows[split]          # every row, in order, nothing moved
        assert all(d.name.startswith(f"{split}/") for d in docs)
    streamed = resolve_corpus(f"hf:{tmp_path / 'ds'},text=content,streaming")
    for split in SPLITS:
        assert [d.text for d in streamed.documents(split)] == rows[split]
    assert streamed.metadata()["streaming"] is True and corpus.metadata()["documents"] == {
        "train": 30, "validation": 6, "test": 7}
    tokenizer = ByteTokenizer()
    test = tokenize_split(streamed, tokenizer, "test", tmp_path / "cache")
    assert test.n_docs == 7 and test.n_bytes == sum(len(t.encode()) for t in rows["test"])
    with pytest.raises(CorpusError, match="text=COLUMN"):
        list(resolve_corpus(f"hf:{tmp_path / 'ds'}").documents("test"))   # no column "text"
    with pytest.raises(CorpusError, match="option 'stream' is not valid"):
        resolve_corpus(f"hf:{tmp_path / 'ds'},stream")


def test_hf_corpus_carves_only_the_splits_a_dataset_does_not_publish(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = _hf_local(tmp_path / "ds", {"train": 200, "test": 9}, column="text")
    corpus = resolve_corpus(f"hf:{tmp_path / 'ds'}")
    test = [d.text for d in corpus.documents("test")]
    validation = list(corpus.documents("validation"))
    train = [d.text for d in corpus.documents("train")]
    assert test == rows["test"]                                   # published: kept as is
    # no published validation: carved from the train rows by the name hash, as for local corpora
    assert validation and all(split_of(d.name, 0.05, 0.0) == "validation" for d in validation)
    assert sorted(train + [d.text for d in validation]) == sorted(rows["train"])
