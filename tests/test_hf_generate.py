"""transformers' generate on blockstate's one-token inference cache (blockstate.hf)."""

import warnings

import pytest
import torch

import blockstate
from blockstate import build_model

pytest.importorskip("transformers")
from blockstate.hf import BlockStateCache, BlockStateConfig, BlockStateForCausalLM  # noqa: E402


def hf_model(name: str, **overrides):
    torch.manual_seed(0)
    model = build_model(name, "tiny", init_std=0.1, **overrides).eval()    # logits of O(1)
    hf = BlockStateForCausalLM(BlockStateConfig(**model.config.to_dict())).eval()
    hf.model.load_state_dict(model.state_dict())
    return model, hf


@pytest.mark.parametrize("name", blockstate.list_models())
def test_greedy_generate_equals_blockstate_for_every_preset(name):
    model, hf = hf_model(name)
    tokens = torch.randint(0, 256, (2, 21))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # unstructured kernels past their training length
        out = hf.generate(tokens, max_new_tokens=6, do_sample=False)
        assert out.tolist() == model.generate(tokens, 6, temperature=0)


def test_generate_prefills_once_then_steps(monkeypatch):
    model, hf = hf_model("bst-sh-s4")
    calls = []
    for name in ("forward", "prefill", "step"):
        original = getattr(type(hf.model), name)
        monkeypatch.setattr(type(hf.model), name,
                            lambda self, *a, _o=original, _n=name, **k: calls.append(_n) or _o(
                                self, *a, **k))
    hf.generate(torch.randint(0, 256, (2, 30)), max_new_tokens=5, do_sample=False)
    assert calls == ["prefill"] + ["step"] * 4


def test_sampling_with_a_seed_and_beam_search():
    model, hf = hf_model("bst-mf-s4")
    tokens = torch.randint(0, 256, (2, 19))
    torch.manual_seed(7)
    sampled = hf.generate(tokens, max_new_tokens=10, do_sample=True, temperature=0.7, top_k=20,
                          top_p=1.0)
    assert sampled.tolist() == model.generate(tokens, 10, temperature=0.7, top_k=20, seed=7)
    for top_p in (None, 0.5, 0.9):     # top_k=0: transformers would otherwise apply top_k=50
        torch.manual_seed(3)
        sampled = hf.generate(tokens, max_new_tokens=12, do_sample=True, temperature=1.3, top_k=0,
                              top_p=top_p)
        assert sampled.tolist() == model.generate(tokens, 12, temperature=1.3, top_p=top_p, seed=3)
    cached = hf.generate(tokens, max_new_tokens=8, num_beams=3, do_sample=False)
    full = hf.generate(tokens, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)                   # reordered cache rows = full recomputation


def test_left_padded_rows_equal_generating_each_alone():
    model, hf = hf_model("bst-sh-ssd")
    short, long = torch.randint(0, 256, (13,)).tolist(), torch.randint(0, 256, (29,)).tolist()
    pad = len(long) - len(short)
    ids = torch.tensor([[0] * pad + short, long])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    assert out[0, pad:].tolist() == model.generate([short], 7, temperature=0)[0]
    assert out[1].tolist() == model.generate([long], 7, temperature=0)[0]
    logits = hf(ids, attention_mask=mask).logits                  # without a cache, the same rows
    torch.testing.assert_close(logits[0, pad:], model(torch.tensor([short]))[0])
    beams = {use_cache: hf.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2,
                                    do_sample=False, pad_token_id=0, use_cache=use_cache)
             for use_cache in (True, False)}               # per-row caches reordered by beam
    assert torch.equal(beams[True], beams[False])


def test_other_masks_and_caches_are_refused():
    _, hf = hf_model("bst-sh-s4")
    ids = torch.ones(2, 5, dtype=torch.long)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="blockstate's own generate"):
        hf.generate(ids, attention_mask=right, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="BlockStateCache"):
        hf(ids, cache=object())
    cache = BlockStateCache(hf.model)
    hf(ids, cache=cache)
    assert cache.get_seq_length() == 5 and cache.batched.position == 5
    cache.reorder_cache(torch.tensor([1, 1, 0]))
    assert cache.batched.batch == 3
