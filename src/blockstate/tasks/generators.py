"""Synthetic long-range tasks for a causal language model: seeded batch generators, each with a
reference solver that recovers every answer from the inputs alone.

A batch scores the model at the same position it reads: having seen `inputs[:, :t + 1]`, it must
output `targets[:, t]`. `distance[:, t]` is how far back the evidence for that answer lies.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import ClassVar

import torch

IGNORE = -100  # target of unscored positions (torch's cross-entropy default, as blockstate.data)


@dataclass
class TaskBatch:
    """Token ids `inputs`, the answer `targets` at each scored position (IGNORE elsewhere), and
    `distance`: t minus the position of the input token holding the answer (-1 where unscored)."""

    inputs: torch.Tensor    # (B, L) long
    targets: torch.Tensor   # (B, L) long
    distance: torch.Tensor  # (B, L) long


class Task(typing.Protocol):
    """What a task provides: a name, a vocabulary and length, seeded batches (`sample`), a reference
    solver that recovers every answer from the inputs alone (`solve`), and chance accuracy."""

    name: ClassVar[str]
    seq_len: int

    @property
    def vocab_size(self) -> int: ...

    def sample(self, batch_size: int, seed: int) -> TaskBatch: ...

    def solve(self, inputs: torch.Tensor) -> torch.Tensor: ...

    def chance(self) -> float: ...


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make the (dataclass) task `cls` available as `cls.name` to `make_task`,
    `blockstate tasks run --task` and the report."""
    if not getattr(cls, "name", None):
        raise ValueError(f"task class {cls.__name__} has no name")
    TASKS[cls.name] = cls
    return cls


def _validate(task: object, rules: list[tuple[str, bool, str]]) -> None:
    """Raise ValueError for the first field that is not an int or whose rule `(field, ok, accepted)` fails."""
    for field in dataclasses.fields(task):
        value = getattr(task, field.name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{type(task).__name__}.{field.name}={value!r}: must be an int")
    for field, ok, accepted in rules:
        if not ok:
            raise ValueError(f"{type(task).__name__}.{field}={getattr(task, field)!r}: {accepted}")


def _distinct(generator: torch.Generator, batch_size: int, start: int, stop: int, count: int) -> torch.Tensor:
    """`count` distinct integers per row, drawn uniformly from [start, stop), in random order."""
    order = torch.rand(batch_size, stop - start, generator=generator).argsort(dim=1)  # (B, stop - start)
    return order[:, :count] + start                                                   # (B, count)


def _copy_batch(symbols: torch.Tensor, positions: torch.Tensor, seq_len: int, blank: int) -> TaskBatch:
    """Write `symbols` at `positions` on blanks, a delimiter (blank + 1) at seq_len - n, and score the n
    positions from the delimiter on with the symbols in order."""
    batch_size, n = symbols.shape                                   # (B, n)
    start = seq_len - n
    inputs = torch.full((batch_size, seq_len), blank, dtype=torch.long)  # (B, L)
    inputs.scatter_(1, positions, symbols)
    inputs[:, start] = blank + 1
    targets = torch.full_like(inputs, IGNORE)                       # (B, L)
    targets[:, start:] = symbols
    distance = torch.full_like(inputs, -1)                          # (B, L)
    distance[:, start:] = torch.arange(start, seq_len) - positions  # (B, n)
    return TaskBatch(inputs, targets, distance)


def _solve_copy(inputs: torch.Tensor, blank: int) -> torch.Tensor:
    """Replay the non-blank tokens before the delimiter (blank + 1), in order, from the delimiter on."""
    predictions = []
    for row in inputs.tolist():
        start = row.index(blank + 1)
        recalled = [token for token in row[:start] if token != blank][:len(row) - start]
        prediction = [IGNORE] * len(row)
        prediction[start:start + len(recalled)] = recalled
        predictions.append(prediction)
    return torch.tensor(predictions, dtype=torch.long).view_as(inputs)  # (B, L)


class _CopyTask:
    """What copying memory and selective copying share: `num_symbols` symbols plus a blank and a
    delimiter, `length` symbols written at `_positions` and replayed in order from the delimiter on."""

    num_symbols: int
    length: int
    seq_len: int

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 2  # symbols, blank, delimiter

    def _positions(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, batch_size: int, seed: int) -> TaskBatch:
        generator = torch.Generator().manual_seed(seed)
        symbols = torch.randint(0, self.num_symbols, (batch_size, self.length), generator=generator)  # (B, n)
        positions = self._positions(generator, batch_size)                                           # (B, n)
        return _copy_batch(symbols, positions, self.seq_len, blank=self.num_symbols)

    def solve(self, inputs: torch.Tensor) -> torch.Tensor:
        return _solve_copy(inputs, blank=self.num_symbols)

    def chance(self) -> float:
        return 1 / self.num_symbols


@register_task
@dataclass(frozen=True)
class CopyingMemory(_CopyTask):
    """Copying memory (Arjovsky et al. 2016, section 4.1): `length` symbols, `lag` blanks, a delimiter and
    `length - 1` blanks; from the delimiter on, the model outputs the symbols in order."""

    name: ClassVar[str] = "copying"
    num_symbols: int = 8  # alphabet size
    length: int = 8       # symbols to copy
    lag: int = 64         # blanks between the symbols and the delimiter

    def __post_init__(self) -> None:
        _validate(self, [("num_symbols", self.num_symbols >= 1, "accepted: >= 1"),
                         ("length", self.length >= 1, "accepted: >= 1"),
                         ("lag", self.lag >= 0, "accepted: >= 0")])

    @property
    def seq_len(self) -> int:
        return 2 * self.length + self.lag

    def _positions(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        return torch.arange(self.length).expand(batch_size, -1)                                  # (B, n)


@register_task
@dataclass(frozen=True)
class AssociativeRecall:
    """Multi-query associative recall (Arora et al. 2023, "Zoology", section 3): `num_pairs` key-value
    pairs, then each key once as a query at a uniform position at least `gap` after the pairs; at a
    query the model outputs that key's value."""

    name: ClassVar[str] = "mqar"
    num_pairs: int = 8
    num_keys: int = 64
    num_values: int = 64
    gap: int = 0          # filler positions between the pairs and the first possible query
    seq_len: int = 256

    def __post_init__(self) -> None:
        _validate(self, [
            ("num_pairs", self.num_pairs >= 1, "accepted: >= 1"),
            ("num_keys", self.num_keys >= self.num_pairs, f"accepted: >= num_pairs={self.num_pairs}"),
            ("num_values", self.num_values >= 1, "accepted: >= 1"),
            ("gap", self.gap >= 0, "accepted: >= 0"),
            ("seq_len", self.seq_len >= 3 * self.num_pairs + self.gap,
             f"accepted: >= 3 * num_pairs + gap = {3 * self.num_pairs + self.gap} (pairs, gap, queries)"),
        ])

    @property
    def filler(self) -> int:
        return self.num_keys + self.num_values

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values + 1  # keys, values, filler

    def sample(self, batch_size: int, seed: int) -> TaskBatch:
        generator = torch.Generator().manual_seed(seed)
        n = self.num_pairs
        keys = _distinct(generator, batch_size, 0, self.num_keys, n)      # (B, n) distinct keys
        values = torch.randint(self.num_keys, self.filler, (batch_size, n), generator=generator)  # (B, n)
        queries = _distinct(generator, batch_size, 2 * n + self.gap, self.seq_len, n)  # (B, n)
        inputs = torch.full((batch_size, self.seq_len), self.filler, dtype=torch.long)  # (B, L)
        inputs[:, 0:2 * n:2] = keys
        inputs[:, 1:2 * n:2] = values
        inputs.scatter_(1, queries, keys)
        targets = torch.full_like(inputs, IGNORE).scatter_(1, queries, values)  # (B, L)
        value_positions = torch.arange(1, 2 * n, 2)                              # (n,)
        distance = torch.full_like(inputs, -1).scatter_(1, queries, queries - value_positions)  # (B, L)
        return TaskBatch(inputs, targets, distance)

    def solve(self, inputs: torch.Tensor) -> torch.Tensor:
        """Bind each key to the value right after it; a key already bound is a query for that value."""
        predictions = []
        for row in inputs.tolist():
            bound: dict[int, int] = {}
            prediction = [IGNORE] * len(row)
            for t, token in enumerate(row):
                if token < self.num_keys:
                    prediction[t] = bound.get(token, IGNORE)
                elif token != self.filler and t > 0 and row[t - 1] < self.num_keys:
                    bound[row[t - 1]] = token
            predictions.append(prediction)
        return torch.tensor(predictions, dtype=torch.long).view_as(inputs)  # (B, L)

    def chance(self) -> float:
        return 1 / self.num_values


@register_task
@dataclass(frozen=True)
class SelectiveCopying(_CopyTask):
    """Selective copying (Gu and Dao 2023, "Mamba", section 4.1.1): `length` symbols at random positions
    of a `region` of blanks, then a delimiter and `length - 1` blanks; from the delimiter on, the model
    outputs the symbols in order of position."""

    name: ClassVar[str] = "selective_copying"
    num_symbols: int = 8  # alphabet size
    length: int = 8       # symbols to copy
    region: int = 64      # positions the symbols are scattered over

    def __post_init__(self) -> None:
        _validate(self, [("num_symbols", self.num_symbols >= 1, "accepted: >= 1"),
                         ("length", self.length >= 1, "accepted: >= 1"),
                         ("region", self.region >= self.length, f"accepted: >= length={self.length}")])

    @property
    def seq_len(self) -> int:
        return self.region + self.length

    def _positions(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        return _distinct(generator, batch_size, 0, self.region, self.length).sort(dim=1).values  # (B, n)


@register_task
@dataclass(frozen=True)
class InductionHead:
    """Induction head (Olsson et al. 2022; Gu and Dao 2023, section 4.1.2): random symbols with a trigger
    at a uniform position p and at the last position; at the last position the model outputs the symbol
    that followed the first trigger, found (seq_len - 1) - (p + 1) >= max(min_distance, 1) positions back."""

    name: ClassVar[str] = "induction"
    num_symbols: int = 16  # ordinary symbols; the trigger is one more token
    seq_len: int = 256
    min_distance: int = 0  # least distance from the answer symbol to the last position

    def __post_init__(self) -> None:
        least = max(self.min_distance, 1) + 2
        _validate(self, [("num_symbols", self.num_symbols >= 1, "accepted: >= 1"),
                         ("min_distance", self.min_distance >= 0, "accepted: >= 0"),
                         ("seq_len", self.seq_len >= least,
                          f"accepted: >= max(min_distance, 1) + 2 = {least}")])

    @property
    def trigger(self) -> int:
        return self.num_symbols

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 1  # symbols, trigger

    def sample(self, batch_size: int, seed: int) -> TaskBatch:
        generator = torch.Generator().manual_seed(seed)
        last = self.seq_len - 1
        inputs = torch.randint(0, self.num_symbols, (batch_size, self.seq_len), generator=generator)  # (B, L)
        latest = last - 1 - max(self.min_distance, 1)                    # last allowed first-trigger position
        first = torch.randint(0, latest + 1, (batch_size, 1), generator=generator)  # (B, 1)
        inputs.scatter_(1, first, self.trigger)
        inputs[:, last] = self.trigger
        targets = torch.full_like(inputs, IGNORE)                        # (B, L)
        targets[:, last:] = inputs.gather(1, first + 1)                  # (B, 1)
        distance = torch.full_like(inputs, -1)                           # (B, L)
        distance[:, last:] = last - (first + 1)                          # (B, 1)
        return TaskBatch(inputs, targets, distance)

    def solve(self, inputs: torch.Tensor) -> torch.Tensor:
        """At a trigger, output the symbol that followed the previous trigger."""
        predictions = []
        for row in inputs.tolist():
            prediction = [IGNORE] * len(row)
            followed = IGNORE
            for t, token in enumerate(row):
                if token == self.trigger:
                    prediction[t] = followed
                    followed = row[t + 1] if t + 1 < len(row) else IGNORE
            predictions.append(prediction)
        return torch.tensor(predictions, dtype=torch.long).view_as(inputs)  # (B, L)

    def chance(self) -> float:
        return 1 / self.num_symbols


@register_task
@dataclass(frozen=True)
class Passkey:
    """Passkey retrieval (Mohtashami and Jaggi 2023, "Landmark Attention"): repeated
    filler text with `digits` random digits after a key marker at `depth` percent of the way from
    the start to the question (-1: a uniform depth per sequence), and at the end a question marker;
    from it on, the model outputs the digits in order."""

    name: ClassVar[str] = "passkey"
    seq_len: int = 256
    depth: int = -1       # percent: 0 puts the key first, 100 right before the question
    digits: int = 5
    # tokens: the digits 0-9, the key marker ("the pass key is"), the question marker ("what is
    # the pass key?"), then a filler sentence of FILLER tokens repeated ("the grass is green. ...")
    KEY: ClassVar[int] = 10
    QUESTION: ClassVar[int] = 11
    FILLER: ClassVar[int] = 16

    def __post_init__(self) -> None:
        least = 2 * self.digits + 1
        _validate(self, [("digits", self.digits >= 1, "accepted: >= 1"),
                         ("depth", -1 <= self.depth <= 100, "accepted: -1 (uniform) or 0..100"),
                         ("seq_len", self.seq_len >= least,
                          f"accepted: >= 2 * digits + 1 = {least} (key, digits, question, digits)")])

    @property
    def vocab_size(self) -> int:
        return 12 + self.FILLER

    @property
    def key_positions(self) -> int:
        """How many positions the key marker can take: from 0 to right before the question."""
        return self.seq_len - 2 * self.digits

    def key_position(self, depth: float) -> int:
        """The key marker's position at `depth` (a fraction in [0, 1])."""
        return round(depth * (self.key_positions - 1))

    def sample(self, batch_size: int, seed: int) -> TaskBatch:
        generator = torch.Generator().manual_seed(seed)
        n, length = self.digits, self.seq_len
        passkey = torch.randint(0, 10, (batch_size, n), generator=generator)             # (B, n)
        if self.depth < 0:
            key = torch.randint(0, self.key_positions, (batch_size, 1), generator=generator)  # (B, 1)
        else:
            key = torch.full((batch_size, 1), self.key_position(self.depth / 100))       # (B, 1)
        filler = 12 + torch.arange(length) % self.FILLER                                 # (L,)
        inputs = filler.expand(batch_size, -1).clone()                                   # (B, L)
        inputs.scatter_(1, key, self.KEY)
        inputs.scatter_(1, key + 1 + torch.arange(n), passkey)
        question = length - n
        inputs[:, question] = self.QUESTION
        inputs[:, question + 1:] = passkey[:, :-1]  # the digits given so far (teacher forcing)
        targets = torch.full_like(inputs, IGNORE)                                        # (B, L)
        targets[:, question:] = passkey
        distance = torch.full_like(inputs, -1)                                           # (B, L)
        distance[:, question:] = question - 1 - key                                      # (B, n)
        return TaskBatch(inputs, targets, distance)

    def solve(self, inputs: torch.Tensor) -> torch.Tensor:
        """Read the digits after the key marker; from the question marker on, output them."""
        predictions = []
        for row in inputs.tolist():
            key, question = row.index(self.KEY), row.index(self.QUESTION)
            prediction = [IGNORE] * len(row)
            prediction[question:] = row[key + 1:key + 1 + self.digits]
            predictions.append(prediction)
        return torch.tensor(predictions, dtype=torch.long).view_as(inputs)  # (B, L)

    def chance(self) -> float:
        return 1 / 10




def make_task(name: str, **params: object) -> Task:
    """Build the task called `name`; string parameter values (from a command line) are converted to the
    field's type."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; accepted: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    types = typing.get_type_hints(cls)
    fields = [field.name for field in dataclasses.fields(cls)]
    for key, value in params.items():
        if key not in fields:
            raise ValueError(f"unknown parameter {key!r} for task {name!r}; accepted: {', '.join(fields)}")
        if isinstance(value, str):
            try:
                params[key] = types[key](value)
            except ValueError:
                raise ValueError(f"{name}.{key}={value!r}: must be an {types[key].__name__}") from None
    return cls(**params)


def score(predictions: torch.Tensor, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether each of the K scored positions of `batch` is predicted right, and its distance."""
    scored = batch.targets != IGNORE                                          # (B, L)
    return predictions[scored] == batch.targets[scored], batch.distance[scored]  # (K,), (K,)
