import pytest
import torch

from blockstate import build_model, list_models
from blockstate.generate import feed, start

from reference import greedy_by_full_forward

MODELS = list_models()
W = 16


def _model(name, **overrides):
    torch.manual_seed(0)
    return build_model(name, "tiny", **overrides).eval()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("prompt_len", [W + 5, 2 * W, 5 * W + 3])  # mid-block, boundary, many blocks
def test_prefill_then_steps_equal_the_parallel_forward(name, prompt_len):
    overrides = {"self_attention": "sliding"} if name.startswith("bst-mf") else {}
    model = _model(name, **overrides)
    tokens = torch.randint(0, 256, (2, prompt_len + 2 * W - 3))
    full = model(tokens)
    state = start(model, 2)
    got = [feed(model, state, tokens[:, :prompt_len])]
    for t in range(prompt_len, tokens.shape[1]):
        got.append(feed(model, state, tokens[:, t:t + 1]))
    assert (torch.cat(got, dim=1) - full).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["bst-sh-s4", "bst-mh-s4d", "bst-mf-s4"])
def test_normalized_unactivated_context_generates_like_the_parallel_forward(name):
    variant, kernel = name.split("-")[1:]
    model = build_model("bst-sh-s4", "tiny", context_variant=variant, ssm_kernel=kernel,
                        context_norm="rms", context_activation="none").eval()
    tokens = torch.randint(0, 256, (2, 3 * W + 5))
    state = start(model, 2)
    got = [feed(model, state, tokens[:, :W + 3])]
    got += [feed(model, state, tokens[:, t:t + 1]) for t in range(W + 3, tokens.shape[1])]
    assert (torch.cat(got, dim=1) - model(tokens)).abs().max() <= 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_equals_greedy_full_forward(name):
    model = _model(name)
    prompt = torch.randint(0, 256, (W + 3,)).tolist()
    out = model.generate([prompt], 2 * W, temperature=0)[0]
    assert out == greedy_by_full_forward(model, prompt, 2 * W)


def test_batched_prompts_of_different_lengths_match_single_generation():
    model = _model("bst-sh-s4")
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, W, 5, 2 * W + 1)]
    batched = model.generate(prompts, 10, temperature=0)
    assert [len(p) for p in batched] == [15, W + 10, 15, 2 * W + 11]
    for prompt, out in zip(prompts, batched, strict=True):
        assert out[:len(prompt)] == prompt
        assert out == model.generate([prompt], 10, temperature=0)[0]


def test_sampling_is_seeded_and_stops():
    model = _model("bst-sh-s4d")
    prompt = [[1, 2, 3]]
    a = model.generate(prompt, 20, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    assert a == model.generate(prompt, 20, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    first = a[0][3]
    stopped = model.generate(prompt, 20, temperature=1.0, top_k=20, top_p=0.9, seed=7, stop=[first])
    assert stopped[0] == [1, 2, 3, first]


def test_bad_generation_requests():
    model = _model("bst-sh-s4")
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([[]], 5)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([[1]], 5, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([[1]], 5, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        model.generate([[1]], 5, top_k=0)
    with pytest.raises(ValueError, match="vocab_size"):
        model.generate([[1, 999]], 5)
    with pytest.raises(ValueError, match="finite"):
        model.generate([[1]], 5, temperature=float("nan"))
    with pytest.raises(ValueError, match="integers"):
        model.generate([[1.7, 2]], 5)
    with pytest.raises(ValueError, match="integers"):
        model.generate(torch.tensor([[1.0, 2.0]]), 5)
    unstructured = _model("bst-sh-unstruct")  # past its training length: allowed, with a warning,
    with pytest.warns(UserWarning, match="trained for"):  # in generation as in the forward pass
        assert len(unstructured.generate([[1] * 120], 20)[0]) == 140
    with pytest.warns(UserWarning, match="trained for"):
        unstructured(torch.ones(1, 140, dtype=torch.long))
