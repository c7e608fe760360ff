"""Bundled offline tasks for lm-evaluation-harness, on held-out Python source.

`TASKS_PATH` is this folder, for `lm_eval --include_path` (or `python -m blockstate.harness
--tasks-path`). Its tasks, both tagged `blockstate_stdlib`, read small JSON-lines files shipped here,
with no download:

- `blockstate_stdlib_bpb` (loglikelihood_rolling): bits per byte, byte and word perplexity on the
  first lines (at most `BPB_CHARS` characters) of every document of python-stdlib's test split
  that has at least `MIN_DOCUMENT_CHARS`;
- `blockstate_stdlib_next_line` (multiple_choice): given `CONTEXT_LINES` lines of one of those
  documents, pick the true next line among it and `DISTRACTORS` lines of the same indentation drawn
  from the other documents; acc, acc_norm and acc_mutual_info (chance: 0.25).

The test split is the one `blockstate train --data python-stdlib` holds out (`split_of`), so a
model trained there has not seen these documents. `write_task_data` generates the files
deterministically from the running interpreter's standard library (`python -m
blockstate.lm_eval_tasks` rewrites the shipped ones); `manifest.json` records the Python version and
documents they came from.
"""

from __future__ import annotations

import json
import platform
import random
from pathlib import Path
from typing import Any

from ..data.corpora import Corpus, StdlibCorpus
from ..fileio import atomic_write

TASKS_PATH = Path(__file__).resolve().parent
BPB_FILE = "stdlib_bpb.jsonl"
NEXT_LINE_FILE = "stdlib_next_line.jsonl"
MANIFEST_FILE = "manifest.json"

MIN_DOCUMENT_CHARS = 512    # shorter test-split documents (stubs, tiny fixtures) are left out
BPB_CHARS = 2048            # each bits-per-byte document: its first whole lines within this many characters
CONTEXT_LINES = 10          # lines before the line to pick
MIN_LINE_CHARS = 16         # a line to pick, or a distractor, has this many characters besides indentation
ITEMS_PER_DOCUMENT = 2      # next-line items drawn from each document
DISTRACTORS = 3
SEED = 0


def _head(text: str, max_chars: int) -> str:
    """The first whole lines of `text` within `max_chars` characters (at least its first line)."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[:cut + 1] if cut >= 0 else text[:max_chars]


def _indentation(line: str) -> str:
    return line[:len(line) - len(line.lstrip())]


def _long_enough(line: str) -> bool:
    return len(line.strip()) >= MIN_LINE_CHARS


def task_rows(corpus: Corpus) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """(bits-per-byte rows, next-line rows, names of the documents used) from `corpus`'s test split."""
    documents = [(doc.name, doc.text) for doc in corpus.documents("test")]
    documents = [(name, text) for name, text in documents if len(text) >= MIN_DOCUMENT_CHARS]
    bpb = [{"name": name, "text": _head(text, BPB_CHARS)} for name, text in documents]
    pool: dict[str, list[tuple[str, str]]] = {}     # indentation -> (document, line)
    for name, text in documents:
        for line in dict.fromkeys(text.split("\n")):
            if _long_enough(line):
                pool.setdefault(_indentation(line), []).append((name, line))
    rng = random.Random(SEED)
    next_line = []
    for name, text in documents:
        lines = text.split("\n")
        candidates = [i for i in range(CONTEXT_LINES, len(lines))
                      if _long_enough(lines[i]) and lines[i] not in lines[i - CONTEXT_LINES:i]]
        for i in sorted(rng.sample(candidates, min(ITEMS_PER_DOCUMENT, len(candidates)))):
            target = lines[i]
            others = [line for source, line in pool[_indentation(target)]
                      if source != name and line != target]
            if len(others) < DISTRACTORS:
                continue
            choices = rng.sample(others, DISTRACTORS)
            answer = rng.randrange(DISTRACTORS + 1)
            choices.insert(answer, target)
            next_line.append({"name": name, "line": i + 1, "context": "\n".join(lines[i - CONTEXT_LINES:i]),
                              "choices": choices, "answer": answer})
    return bpb, next_line, [name for name, _ in documents]


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode()


def write_task_data(directory: str | Path = TASKS_PATH, corpus: Corpus | None = None) -> dict[str, int]:
    """Write the tasks' data files (and manifest.json) into `directory` from `corpus` (default: this
    interpreter's python-stdlib); returns the number of rows of each file."""
    corpus = corpus or StdlibCorpus()
    bpb, next_line, names = task_rows(corpus)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / BPB_FILE, _jsonl(bpb))
    atomic_write(directory / NEXT_LINE_FILE, _jsonl(next_line))
    manifest = {"corpus": corpus.name, "split": "test", "python_version": platform.python_version(),
                "python_implementation": platform.python_implementation(), "documents": names,
                "rows": {BPB_FILE: len(bpb), NEXT_LINE_FILE: len(next_line)}}
    atomic_write(directory / MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest["rows"]


__all__ = ["TASKS_PATH", "task_rows", "write_task_data"]
