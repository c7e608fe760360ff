"""The lm-evaluation-harness adapter (blockstate.harness): rolling log-likelihood equal to
`blockstate eval`'s loss on the same tokens, continuation scoring against a direct forward pass,
and a local task (JSON data, no downloads) run end to end through `lm_eval.simple_evaluate`."""

import json
import logging
import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from blockstate.data import (  # noqa: E402
    ByteTokenizer,
    DirectoryCorpus,
    PackedSequences,
    TokenizedSplit,
    train_sentencepiece,
)
from blockstate.evaluate import iter_losses  # noqa: E402
from blockstate.harness import BlockStateHarnessLM, largest_batch  # noqa: E402
from blockstate.registry import build_model  # noqa: E402

TEXT = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # five\n" * 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("bst-sh-s4", "tiny", vocab_size=259).eval()
    directory = tmp_path_factory.mktemp("export")
    model.save_pretrained(directory, ByteTokenizer())
    return directory, model


def _requests(*args):
    return [SimpleNamespace(args=a) for a in args]


@pytest.mark.parametrize("max_length", [16, 48, 1024])
def test_rolling_loglikelihood_equals_blockstate_eval_on_the_same_tokens(exported, max_length):
    directory, model = exported
    lm = BlockStateHarnessLM(pretrained=str(directory), max_length=max_length, batch_size=3)
    (rolling,) = lm.loglikelihood_rolling(_requests((TEXT,)))
    tok = ByteTokenizer()
    ids = [tok.bos_id] + tok.encode(TEXT) + [tok.eos_id]  # a document as eval tokenizes it
    split = TokenizedSplit(np.asarray(ids, dtype=np.uint16), np.array([0, len(ids)]),
                           len(TEXT.encode()), {}, None)
    losses = []
    for targets, loss in iter_losses(model, PackedSequences(split, max_length, tok.pad_id), 2, None,
                                     torch.device("cpu")):
        losses.append(loss[(targets != -100) & (targets != tok.eos_id)])
    expected = -float(torch.cat(losses).double().sum())
    assert len(torch.cat(losses)) == len(ids) - 2  # every text token once, EOS aside
    assert rolling == pytest.approx(expected, rel=1e-6, abs=1e-4)


def _direct_logprob(model, ids: list[int], n: int) -> tuple[float, bool]:
    """The summed log-probability of the last `n` of `ids` in one forward pass, and whether each is
    the argmax."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0].double().log_softmax(-1)
    positions, targets = torch.arange(len(ids) - 1 - n, len(ids) - 1), torch.tensor(ids[-n:])
    return float(logits[positions, targets].sum()), bool((logits[positions].argmax(-1) == targets).all())


def test_loglikelihood_scores_the_continuation_against_a_direct_forward_pass(exported):
    directory, model = exported
    lm = BlockStateHarnessLM(pretrained=str(directory), batch_size=2)
    tok = ByteTokenizer()
    # (context, continuation, the text scored): a context's trailing whitespace moves to the
    # continuation, as in lm_eval's HF adapter
    cases = [("def add(a, b", "):", "):"), ("print(", "add(2, 3))", "add(2, 3))"), ("x = ", "1", " 1")]
    results = lm.loglikelihood(_requests(*[case[:2] for case in cases]))
    for (context, continuation, scored), (logprob, greedy) in zip(cases, results, strict=True):
        expected, expected_greedy = _direct_logprob(model, [tok.bos_id] + tok.encode(context + continuation),
                                                    len(tok.encode(scored)))
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert greedy == expected_greedy
    # a continuation of the model's own greedy choice is greedy (a context without trailing
    # whitespace, which would move into the continuation)
    context = "def"
    first = lm.generate_until(_requests((context, {"max_gen_toks": 3, "until": []})))[0]
    assert len(first.encode()) <= 3
    if first:
        assert lm.loglikelihood(_requests((context, first)))[0][1]


def test_generate_until_is_greedy_and_stops_at_the_until_string(exported):
    directory, model = exported
    lm = BlockStateHarnessLM(pretrained=str(directory))
    tok = ByteTokenizer()
    full = lm.generate_until(_requests(("print(", {"max_gen_toks": 12, "until": []})))[0]
    ids = model.generate([[tok.bos_id] + tok.encode("print(")], 12, temperature=0)[0]
    assert full == tok.decode([t for t in ids[len(tok.encode("print(")) + 1:] if t != tok.eos_id])
    if len(full) > 2:
        stop = full[2]
        cut = lm.generate_until(_requests(("print(", {"max_gen_toks": 12, "until": [stop]})))[0]
        assert cut == full[:full.index(stop)]


@pytest.mark.slow
def test_a_local_task_runs_end_to_end_through_lm_eval(exported, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    directory, _ = exported
    data = tmp_path / "data.jsonl"
    docs = [{"question": "2 + 3 =", "choices": [" 5", " 7"], "answer": 0, "text": TEXT},
            {"question": "print(", "choices": ["add", "sub"], "answer": 0, "text": TEXT[:40]}]
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
              f"test_split: test\n")
    (tasks / "choice.yaml").write_text(
        "task: blockstate_local_choice\n" + common + "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    (tasks / "rolling.yaml").write_text(
        "task: blockstate_local_rolling\n" + common + "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n")
    results = lm_eval.simple_evaluate(
        model="blockstate", model_args=f"pretrained={directory},max_length=64",
        tasks=["blockstate_local_choice", "blockstate_local_rolling"],
        task_manager=TaskManager(include_path=str(tasks)))["results"]
    assert 0.0 <= results["blockstate_local_choice"]["acc,none"] <= 1.0
    bpb = results["blockstate_local_rolling"]["bits_per_byte,none"]
    # an untrained byte model: about ln(259) nats per byte
    assert math.isfinite(bpb) and 6.0 < bpb < 10.0


# A SentencePiece BPE tokenizer, whose merges can cross the context/continuation boundary

def _code_corpus(root: Path) -> DirectoryCorpus:
    rng = random.Random(0)
    names = ["x", "y", "total", "value", "count", "result"]
    root.mkdir()
    for i in range(30):
        lines = []
        for _ in range(60):
            a, b = rng.choice(names), rng.choice(names)
            lines.append(rng.choice([f"{a} = {rng.randint(1, 3)}", f"{a} = {a} + {b}", f"print({a}, {b})",
                                     f"def {a}_{b}({a}, {b}):", f"    return {a} * {b}"]))
        (root / f"doc{i:02d}.py").write_text("\n".join(lines) + "\n")
    return DirectoryCorpus(root)


@pytest.fixture(scope="module")
def bpe_exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    tokenizer = train_sentencepiece(_code_corpus(root / "corpus"), 340, root / "tokenizer")
    torch.manual_seed(0)
    model = build_model("bst-sh-s4", "tiny", vocab_size=tokenizer.vocab_size).eval()
    model.save_pretrained(root / "export", tokenizer)
    return root / "export", model, tokenizer


def test_loglikelihood_with_bpe_scores_the_continuation_tokens_only(bpe_exported):
    directory, model, tok = bpe_exported
    lm = BlockStateHarnessLM(pretrained=str(directory), batch_size=3)
    pieces = lambda text: [tok.piece(i) for i in tok.encode(text)]  # noqa: E731
    assert pieces("x = ") == ["x", "▁=", "▁"] and pieces("x = 1") == ["x", "▁=", "▁1"]
    assert pieces("x = 1\npri")[-2:] == ["pr", "i"] and pieces("x = 1\nprint(x, y)")[4] == "print"
    # (context, continuation, the pieces scored)
    cases = [("x = ", "1", ["▁1"]),                     # a space at the context's end merges with "1"
             ("x =", " 1", ["▁1"]),                     # the same text, split as lm_eval tasks do
             ("print(x, ", "y)", ["▁y", ")"]),
             ("def total_", "count(total, count):", ["count", "(", "total", ",", "▁count", "):"]),
             # mid-word, "pri" + "nt" merging: back to the token boundary before "print"
             ("x = 1\npri", "nt(x, y)", ["print", "(", "x", ",", "▁y", ")"])]
    results = lm.loglikelihood(_requests(*[case[:2] for case in cases]))
    for (context, continuation, scored), (logprob, greedy) in zip(cases, results, strict=True):
        ids = [tok.bos_id] + tok.encode(context + continuation)
        assert [tok.piece(i) for i in ids[-len(scored):]] == scored
        expected, expected_greedy = _direct_logprob(model, ids, len(scored))
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert greedy == expected_greedy
        assert lm.split(context, continuation) == (ids[1:], len(scored))
    assert results[0] == results[1]
    # cut to the last max_length tokens: the scored ones keep their place at the end
    short = BlockStateHarnessLM(pretrained=str(directory), max_length=4)
    (logprob, _), = short.loglikelihood(_requests(cases[3][:2]))
    ids = ([tok.bos_id] + tok.encode(cases[3][0] + cases[3][1]))[-5:]
    assert logprob == pytest.approx(_direct_logprob(model, ids, 4)[0], rel=1e-5, abs=1e-4)
    with pytest.raises(ValueError, match="empty continuation"):
        lm.loglikelihood(_requests(("x = 1", "")))


def test_rolling_and_generation_with_bpe_match_direct_passes(bpe_exported):
    directory, model, tok = bpe_exported
    text = "def total_count(total, count):\n    return total * count\nprint(x, y)\n"
    ids = [tok.bos_id] + tok.encode(text)
    whole = BlockStateHarnessLM(pretrained=str(directory), max_length=len(ids))
    (rolling,) = whole.loglikelihood_rolling(_requests((text,)))
    assert rolling == pytest.approx(_direct_logprob(model, ids, len(ids) - 1)[0], rel=1e-5, abs=1e-4)
    windowed = BlockStateHarnessLM(pretrained=str(directory), max_length=8, batch_size=2)
    (rolling,) = windowed.loglikelihood_rolling(_requests((text,)))
    expected = sum(_direct_logprob(model, ids[k:k + 9], len(ids[k:k + 9]) - 1)[0]
                   for k in range(0, len(ids) - 1, 8))
    assert rolling == pytest.approx(expected, rel=1e-5, abs=1e-4)
    (completion,) = whole.generate_until(_requests(("x = ", {"max_gen_toks": 6, "until": []})))
    prompt = [tok.bos_id] + tok.encode("x = ")
    generated = model.generate([prompt], 6, temperature=0)[0][len(prompt):]
    assert completion == tok.decode([t for t in generated if t != tok.eos_id])


# batch_size and device from --model_args or lm_eval's flags

def test_model_args_and_command_line_flags_merge_without_a_duplicate_keyword(exported, monkeypatch, caplog):
    directory, _ = exported
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # what lm_eval's command line passes when --batch_size and --device are not given
    cli = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}
    with caplog.at_level(logging.WARNING, logger="blockstate.harness"):
        lm = BlockStateHarnessLM.create_from_arg_string(f"pretrained={directory},batch_size=8", cli)
    assert lm.batch_size == 8 and lm.device == torch.device("cpu")
    assert "cuda:0 is not available on this machine; evaluating on the cpu" in caplog.text
    assert "overrides" not in caplog.text
    lm = BlockStateHarnessLM.create_from_arg_obj({"pretrained": str(directory)},
                                                 {"batch_size": "4", "device": "cpu"})
    assert lm.batch_size == 4 and lm.device == torch.device("cpu")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="blockstate.harness"):
        lm = BlockStateHarnessLM.create_from_arg_string(f"pretrained={directory},device=cpu,batch_size=2",
                                                        {"batch_size": "16", "device": None})
    assert lm.batch_size == 2 and "batch_size=2 from --model_args overrides --batch_size 16" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="blockstate.harness"):
        BlockStateHarnessLM.create_from_arg_string(f"pretrained={directory},batchsize=8", {})
    assert "ignoring model arguments batchsize=8 (known: pretrained, device" in caplog.text
    assert BlockStateHarnessLM(pretrained=str(directory)).device == torch.device("cpu")


def test_batch_size_auto_is_a_probe_on_cuda_and_refused_on_the_cpu(exported, monkeypatch):
    directory, _ = exported
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="on cpu give a number instead, e.g. batch_size=8"):
        BlockStateHarnessLM.create_from_arg_string(f"pretrained={directory},batch_size=auto",
                                                   {"device": "cuda"})
    for bad in (0, "eight"):
        with pytest.raises(ValueError, match="give an integer >= 1 or auto"):
            BlockStateHarnessLM(pretrained=str(directory), batch_size=bad)
    tried = []

    def runs(batch):  # 24 rows fit
        tried.append(batch)
        if batch > 24:
            raise torch.cuda.OutOfMemoryError("out of memory")

    assert largest_batch(runs, 64) == 16 and tried == [1, 2, 4, 8, 16, 32]
    tried.clear()
    assert largest_batch(runs, 20) == 20 and tried == [1, 2, 4, 8, 16, 20]
    with pytest.raises(RuntimeError, match="even one row"):
        largest_batch(lambda batch: runs(batch + 100), 8)

    def fft(batch):  # the FFT convolution's cuFFT says it differently
        if batch > 2:
            raise RuntimeError("cuFFT error: CUFFT_ALLOC_FAILED")

    def broken(batch):  # other errors are not memory
        raise RuntimeError("shape mismatch")

    assert largest_batch(fft, 64) == 2
    with pytest.raises(RuntimeError, match="shape mismatch"):
        largest_batch(broken, 8)
    # the probe's forward pass itself (on the cpu here, where nothing runs out of memory)
    lm = BlockStateHarnessLM(pretrained=str(directory), max_length=32)
    assert largest_batch(lm._forward_pad_rows, 4) == 4
