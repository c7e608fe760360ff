"""The bundled tasks' datasets, for `custom_dataset: !function stdlib_data.NAME` in their YAML files:
lm_eval loads this file by its path, so it reads the JSON-lines files next to it (a relative
`data_files` would be read from the working directory)."""

import json
from pathlib import Path

import datasets


def _test_split(file_name: str) -> dict[str, datasets.Dataset]:
    lines = Path(__file__).with_name(file_name).read_text(encoding="utf-8").splitlines()
    return {"test": datasets.Dataset.from_list([json.loads(line) for line in lines])}


def bits_per_byte(**metadata) -> dict[str, datasets.Dataset]:
    return _test_split("stdlib_bpb.jsonl")


def next_line(**metadata) -> dict[str, datasets.Dataset]:
    return _test_split("stdlib_next_line.jsonl")
