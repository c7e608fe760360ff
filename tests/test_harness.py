"""The lm-evaluation-harness adapter (blockstate.harness): rolling log-likelihood equal to
`blockstate eval`'s loss on the same tokens, continuation scoring against a direct forward pass,
and a local task (JSON data, no downloads) run end to end through `lm_eval.simple_evaluate`."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from blockstate.data import ByteTokenizer, PackedSequences, TokenizedSplit  # noqa: E402
from blockstate.evaluate import iter_losses  # noqa: E402
from blockstate.harness import BlockStateHarnessLM  # noqa: E402
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


def test_loglikelihood_scores_the_continuation_against_a_direct_forward_pass(exported):
    directory, model = exported
    lm = BlockStateHarnessLM(pretrained=str(directory), batch_size=2)
    tok = ByteTokenizer()
    pairs = [("def add(a, b", "):"), ("print(", "add(2, 3))"), ("x = ", "1")]
    results = lm.loglikelihood(_requests(*pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, results, strict=True):
        tokens = [tok.bos_id] + tok.encode(context + continuation)
        with torch.no_grad():
            logits = model(torch.tensor([tokens[:-1]]))[0].double().log_softmax(-1)
        n = len(tok.encode(continuation))
        picked = logits[torch.arange(len(tokens) - 1 - n, len(tokens) - 1), torch.tensor(tokens[-n:])]
        assert logprob == pytest.approx(float(picked.sum()), rel=1e-5, abs=1e-4)
        argmax = logits[len(tokens) - 1 - n:].argmax(-1)
        assert greedy == bool((argmax == torch.tensor(tokens[-n:])).all())
    # a continuation of the model's own greedy choice is greedy
    context = "def "
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
