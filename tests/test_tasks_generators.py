"""Tests of the synthetic long-range tasks: the reference solvers recover every target from the inputs,
sampling is seeded and leaves the global RNG alone, distances point at the evidence, and the answer is
not available closer than that distance."""

import pytest
import torch

from blockstate.tasks.generators import (
    IGNORE,
    TASKS,
    AssociativeRecall,
    CopyingMemory,
    InductionHead,
    Passkey,
    SelectiveCopying,
    TaskBatch,
    make_task,
    score,
)

SETTINGS = [
    CopyingMemory(),
    CopyingMemory(num_symbols=1, length=1, lag=0),
    CopyingMemory(num_symbols=3, length=5, lag=1),
    AssociativeRecall(),
    AssociativeRecall(num_pairs=1, num_keys=1, num_values=1, seq_len=3),
    AssociativeRecall(num_pairs=6, num_keys=6, num_values=2, gap=5, seq_len=23),  # queries fill the region
    AssociativeRecall(num_pairs=4, num_keys=10, num_values=7, gap=20, seq_len=64),
    SelectiveCopying(),
    SelectiveCopying(num_symbols=1, length=1, region=1),
    SelectiveCopying(num_symbols=4, length=6, region=6),  # every region position holds a symbol
    InductionHead(),
    InductionHead(num_symbols=1, seq_len=3),
    InductionHead(num_symbols=4, seq_len=12, min_distance=10),
    InductionHead(num_symbols=4, seq_len=40, min_distance=7),
    Passkey(),
    Passkey(seq_len=3, digits=1),                      # key, digit, question: nothing else
    Passkey(seq_len=40, depth=0, digits=3),
    Passkey(seq_len=41, depth=100, digits=5),
    Passkey(seq_len=1000, depth=37, digits=2),
]
DEFAULTS = [cls() for cls in TASKS.values()]


def scored_positions(batch: TaskBatch) -> list[tuple[int, int, int, int]]:
    """(row, t, target, distance) for every scored position."""
    rows, ts = (batch.targets != IGNORE).nonzero(as_tuple=True)
    return [(b, t, batch.targets[b, t].item(), batch.distance[b, t].item())
            for b, t in zip(rows.tolist(), ts.tolist(), strict=True)]


def answers(task) -> range:
    """The tokens that can be an answer."""
    if isinstance(task, AssociativeRecall):
        return range(task.num_keys, task.num_keys + task.num_values)
    if isinstance(task, Passkey):
        return range(10)
    return range(task.num_symbols)


def scored_per_row(task) -> int:
    if isinstance(task, AssociativeRecall):
        return task.num_pairs
    if isinstance(task, InductionHead):
        return 1
    if isinstance(task, Passkey):
        return task.digits
    return task.length


@pytest.mark.parametrize("task", SETTINGS, ids=repr)
def test_solver_recovers_targets_from_inputs(task):
    batch = task.sample(16, seed=3)
    assert torch.equal(task.solve(batch.inputs), batch.targets)


@pytest.mark.parametrize("task", SETTINGS, ids=repr)
def test_shapes_dtypes_and_token_ranges(task):
    batch = task.sample(8, seed=1)
    for tensor in (batch.inputs, batch.targets, batch.distance):
        assert tensor.shape == (8, task.seq_len)
        assert tensor.dtype == torch.long
        assert tensor.device.type == "cpu"
    assert 0 <= batch.inputs.min() and batch.inputs.max() < task.vocab_size
    scored = batch.targets != IGNORE
    assert (scored.sum(dim=1) == scored_per_row(task)).all()
    assert set(batch.targets[scored].tolist()) <= set(answers(task))
    assert torch.equal(scored, batch.distance != -1)
    assert (batch.distance[scored] >= 1).all()
    assert task.chance() == pytest.approx(1 / len(answers(task)))


@pytest.mark.parametrize("task", SETTINGS, ids=repr)
def test_distance_points_at_the_evidence(task):
    batch = task.sample(16, seed=5)
    for b, t, target, distance in scored_positions(batch):
        evidence = t - distance
        assert batch.inputs[b, evidence] == target
        if isinstance(task, AssociativeRecall):
            assert batch.inputs[b, evidence - 1] == batch.inputs[b, t]  # the key, bound to its value
        if isinstance(task, InductionHead):
            assert batch.inputs[b, evidence - 1] == batch.inputs[b, t] == task.trigger
            assert distance >= max(task.min_distance, 1)
        if isinstance(task, CopyingMemory):
            assert distance == task.length + task.lag


@pytest.mark.parametrize("task", [SelectiveCopying(), SelectiveCopying(num_symbols=4, length=6, region=6)],
                         ids=repr)
def test_selective_copying_evidence_is_in_order_of_position(task):
    batch = task.sample(16, seed=2)
    evidence = torch.arange(task.seq_len) - batch.distance                    # (B, L)
    start = task.seq_len - task.length
    evidence = evidence[:, start:]                                            # (B, length)
    assert (evidence[:, 1:] > evidence[:, :-1]).all()
    assert (batch.inputs[:, :start].ne(task.num_symbols).sum(dim=1) == task.length).all()


@pytest.mark.parametrize("task", SETTINGS, ids=repr)
def test_answer_is_only_available_at_the_distance(task):
    batch = task.sample(16, seed=7)
    inputs = batch.inputs
    if isinstance(task, CopyingMemory | SelectiveCopying):
        blank = task.num_symbols
        last_symbol = (torch.arange(task.seq_len) - batch.distance)[:, -1]    # evidence of the last target
        for b in range(len(inputs)):
            after = inputs[b, last_symbol[b] + 1:]
            assert ((after == blank) | (after == blank + 1)).all()           # blanks and the delimiter only
    if isinstance(task, AssociativeRecall):
        queries = inputs[:, 2 * task.num_pairs:]
        assert (queries < task.num_keys).logical_or(queries == task.num_keys + task.num_values).all()
        for b, t, _, distance in scored_positions(batch):
            assert batch.inputs[b, t] not in inputs[b, t - distance + 1:t]  # the key is not asked twice
        for row, region in zip(inputs, queries, strict=True):
            keys = row[0:2 * task.num_pairs:2]
            queried = region[region < task.num_keys]
            assert len(set(keys.tolist())) == task.num_pairs
            assert sorted(queried.tolist()) == sorted(keys.tolist())
    if isinstance(task, InductionHead):
        assert ((inputs == task.trigger).sum(dim=1) == 2).all()
    if isinstance(task, Passkey):  # digits only after the key marker and from the question on
        key = (inputs == task.KEY).nonzero()[:, 1]
        assert torch.equal((inputs == task.KEY).nonzero()[:, 0], torch.arange(len(inputs)))
        for b, row in enumerate(inputs):
            digits = (row < 10).nonzero().flatten().tolist()
            question = task.seq_len - task.digits
            expected = [*range(key[b] + 1, key[b] + 1 + task.digits), *range(question + 1, task.seq_len)]
            assert digits == expected and row[question] == task.QUESTION


def test_distances_cover_their_whole_range():
    induction = InductionHead(num_symbols=4, seq_len=10, min_distance=3)
    distances = induction.sample(400, seed=0).distance[:, -1]
    assert set(distances.tolist()) == set(range(3, 9))
    mqar = AssociativeRecall(num_pairs=2, num_keys=4, num_values=4, gap=1, seq_len=9)
    distances = mqar.sample(400, seed=0).distance
    assert set(distances[distances != -1].tolist()) == set(range(2, 8))


@pytest.mark.parametrize("task", DEFAULTS, ids=repr)
def test_sampling_is_seeded_and_leaves_the_global_rng_alone(task):
    state = torch.get_rng_state()
    first, again, other = task.sample(8, seed=11), task.sample(8, seed=11), task.sample(8, seed=12)
    assert torch.equal(torch.get_rng_state(), state)
    for name in ("inputs", "targets", "distance"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.inputs, other.inputs)


@pytest.mark.parametrize("cls, params, field", [
    (CopyingMemory, {"num_symbols": 0}, "num_symbols"),
    (CopyingMemory, {"length": 0}, "length"),
    (CopyingMemory, {"lag": -1}, "lag"),
    (CopyingMemory, {"lag": 2.0}, "lag"),
    (CopyingMemory, {"length": True}, "length"),
    (AssociativeRecall, {"num_pairs": 0}, "num_pairs"),
    (AssociativeRecall, {"num_pairs": 9, "num_keys": 8}, "num_keys"),
    (AssociativeRecall, {"num_values": 0}, "num_values"),
    (AssociativeRecall, {"gap": -1}, "gap"),
    (AssociativeRecall, {"num_pairs": 8, "gap": 9, "seq_len": 32}, "seq_len"),
    (SelectiveCopying, {"length": 9, "region": 8}, "region"),
    (SelectiveCopying, {"num_symbols": 0}, "num_symbols"),
    (InductionHead, {"seq_len": 2}, "seq_len"),
    (InductionHead, {"seq_len": 10, "min_distance": 9}, "seq_len"),
    (InductionHead, {"min_distance": -1}, "min_distance"),
    (InductionHead, {"num_symbols": 0}, "num_symbols"),
    (Passkey, {"digits": 0}, "digits"),
    (Passkey, {"depth": 101}, "depth"),
    (Passkey, {"depth": -2}, "depth"),
    (Passkey, {"seq_len": 10, "digits": 5}, "seq_len"),
])
def test_invalid_parameters_are_rejected_naming_the_field(cls, params, field):
    with pytest.raises(ValueError, match=rf"\.{field}="):
        cls(**params)


def test_boundary_parameters_are_accepted():
    AssociativeRecall(num_pairs=8, gap=8, seq_len=32)
    InductionHead(seq_len=11, min_distance=9)


def test_make_task_converts_strings_and_rejects_unknown_names():
    assert make_task("copying", lag="32") == CopyingMemory(lag=32)
    assert make_task("mqar", num_pairs=4, seq_len="64") == AssociativeRecall(num_pairs=4, seq_len=64)
    assert {name: cls.name for name, cls in TASKS.items()} == {name: name for name in TASKS}
    assert set(TASKS) == {"copying", "mqar", "selective_copying", "induction", "passkey"}
    with pytest.raises(ValueError, match="unknown task 'copy'.*copying, induction, mqar, passkey, "
                                         "selective_copying"):
        make_task("copy")
    with pytest.raises(ValueError, match="unknown parameter 'delay'.*num_symbols, length, lag"):
        make_task("copying", delay="3")
    with pytest.raises(ValueError, match=r"copying\.lag='x'"):
        make_task("copying", lag="x")
    with pytest.raises(ValueError, match=r"\.lag=-3"):
        make_task("copying", lag="-3")


def test_score_flattens_the_scored_positions():
    task = AssociativeRecall(num_pairs=4, seq_len=32)
    batch = task.sample(3, seed=0)
    predictions = task.solve(batch.inputs)
    correct, distance = score(predictions, batch)
    assert correct.shape == distance.shape == (12,)
    assert correct.all()
    assert torch.equal(distance, batch.distance[batch.distance != -1])
    b, t = (batch.targets != IGNORE).nonzero()[5]
    predictions[b, t] = task.num_keys + (predictions[b, t] - task.num_keys + 1) % task.num_values
    correct, _ = score(predictions, batch)
    assert correct.tolist() == [True] * 5 + [False] + [True] * 6


def test_induction_at_a_longer_length_keeps_the_vocabulary():
    trained, longer = InductionHead(seq_len=64), InductionHead(seq_len=512)
    assert trained.vocab_size == longer.vocab_size
    batch = longer.sample(4, seed=0)
    assert torch.equal(longer.solve(batch.inputs), batch.targets)


def test_passkey_reference_solver_scores_one():
    task = Passkey(seq_len=128, depth=40)
    batch = task.sample(32, seed=0)
    correct, _ = score(task.solve(batch.inputs), batch)
    assert correct.float().mean().item() == 1.0 and len(correct) == 32 * 5


@pytest.mark.parametrize("seq_len", [11, 64, 257, 4096])
def test_passkey_depth_places_the_key_from_the_start_to_the_question(seq_len):
    """depth 0: the key marker first; 100: the last digit right before the question; between, the
    marker at that fraction of its range; -1 (training): anywhere in it. Every length is exact."""
    digits = 5
    key_at = {}
    for depth in (0, 25, 50, 75, 100):
        task = Passkey(seq_len=seq_len, depth=depth, digits=digits)
        batch = task.sample(4, seed=depth)
        assert batch.inputs.shape == (4, seq_len)
        positions = (batch.inputs == task.KEY).nonzero()[:, 1]
        assert (positions == positions[0]).all()
        key_at[depth] = positions[0].item()
        assert key_at[depth] == round(depth / 100 * (seq_len - 2 * digits - 1))
    assert key_at[0] == 0 and key_at[100] + digits + 1 == seq_len - digits  # then the question
    assert list(key_at.values()) == sorted(key_at.values())
    uniform = Passkey(seq_len=seq_len, digits=digits).sample(2000, seed=0)
    positions = (uniform.inputs == Passkey.KEY).nonzero()[:, 1]
    assert positions.min() >= 0 and positions.max() <= key_at[100]
    if seq_len <= 64:
        assert set(positions.tolist()) == set(range(key_at[100] + 1))


def test_passkey_evaluated_longer_keeps_the_vocabulary_and_is_seeded():
    trained, longer = Passkey(seq_len=64), Passkey(seq_len=4096, depth=50)
    assert trained.vocab_size == longer.vocab_size == 28
    first, again = longer.sample(3, seed=9), longer.sample(3, seed=9)
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.targets, again.targets)
    assert not torch.equal(first.targets, longer.sample(3, seed=10).targets)
    assert make_task("passkey", seq_len="128", depth="50") == Passkey(seq_len=128, depth=50)
