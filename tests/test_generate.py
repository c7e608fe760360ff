import pytest
import torch

from blockstate import build_model, list_models

from reference import greedy_by_full_forward

MODELS = list_models()
W = 16
# the presets whose generation cache does not grow with the context, by their tag (test_registry
# checks the tag against the config's `constant_inference_state`)
CONSTANT_STATE = list_models("constant-state")


def _model(name, **overrides):
    torch.manual_seed(0)
    # init_std 0.1 instead of 0.02: at 0.02 a 1% change of an SSM's or recurrent state's
    # parameters moves the logits by less than the 1e-4 tolerance (the context path starts weak),
    # at 0.1 by 4e-3 to 4e-2, so a wrong cache cannot pass.
    return build_model(name, "tiny", init_std=0.1, **overrides).eval()


def _prefill_and_step(model, tokens, prompt_len):
    cache = model.allocate_inference_cache(tokens.shape[0])
    got = [model.prefill(tokens[:, :prompt_len], cache)]
    got += [model.step(tokens[:, t], cache).unsqueeze(1) for t in range(prompt_len, tokens.shape[1])]
    assert cache.position == tokens.shape[1]
    return torch.cat(got, dim=1), cache


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("prompt_len", [1, W + 5, 2 * W, 3 * W + 7])  # mid-block, boundary, long
def test_prefill_then_steps_equal_the_parallel_forward(name, prompt_len):
    model = _model(name)
    tokens = torch.randint(0, 256, (3, prompt_len + 3 * W + 2))   # steps cross 3 block boundaries
    got, _ = _prefill_and_step(model, tokens, prompt_len)
    torch.testing.assert_close(got, model(tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("overrides", [
    {"context_variant": "mf", "self_attention": "sliding"},
    {"context_variant": "sh", "context_norm": "rms", "context_activation": "none"},
    {"context_variant": "mh", "ssm_kernel": "s4d", "context_norm": "rms"},
    {"context_variant": "mf", "ssm_kernel": "s4", "context_norm": "rms", "context_activation": "none"},
    {"context_variant": "sh", "ssm_method": "fft"},
    {"context_variant": "sh", "ssm_kernel": "s4d", "s4d_init": "real"},  # decays only
    {"context_variant": "sh", "qk_norm": False},   # the step's precomputed 1/sqrt(Dh) scales
    {"context_variant": "mf", "qk_norm": False, "self_attention": "sliding"},
    {"ssm_kernel": "ssd", "ssd_heads": 16, "ssd_decay": "state"},        # S6-like selective decays
    {"context_variant": "mf", "ssm_kernel": "ssd", "ssd_decay": "state", "ssd_bc_norm": True},
    {"ssm_kernel": "ssd", "ssd_decay": "complex"},                       # rotating selective modes
    {"context_variant": "mf", "ssm_kernel": "ssd", "ssd_decay": "complex", "ssd_bc_norm": True},
    {"ssm_kernel": "ssd", "ssd_decay": "rotary"},           # one real decay per head, rotating modes
    {"context_variant": "mf", "ssm_kernel": "ssd", "ssd_decay": "rotary"},
    {"ssm_kernel": "ssd", "ssd_decay": "rotary", "ssd_still_modes": 2},   # modes that do not turn
    {"ssm_kernel": "ssd", "ssd_bc_norm": True, "tie_embeddings": False,  # an output head of its own
     "context_direct": True},                            # and the context outputs read directly
    {"context_variant": "mh", "ssm_kernel": "s4d", "context_direct": True},
])
def test_other_context_settings_step_like_the_parallel_forward(overrides):
    model = _model("bst-sh-s4", **overrides)
    tokens = torch.randint(0, 256, (2, 5 * W + 3))
    got, _ = _prefill_and_step(model, tokens, W + 3)
    torch.testing.assert_close(got, model(tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["bst-sh-s4", "bst-mh-s4", "bst-mf-s4", "slide", "brt", "samba"])
def test_one_row_steps_and_training_afterwards(name):
    """Batch 1 (S4's dense state update takes another product there), and the step's inference
    mode leaves nothing behind that autograd refuses: its outputs train the model afterwards."""
    model = _model(name)
    tokens = torch.randint(0, 256, (1, 3 * W + 2))
    got, cache = _prefill_and_step(model, tokens, W + 1)
    torch.testing.assert_close(got, model(tokens), atol=1e-4, rtol=0)
    logits = model.step(tokens[:, -1], cache)
    model.train()
    model(got.argmax(-1)).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    probe = torch.nn.Linear(logits.shape[-1], 1)  # a step's logits as the input of a trained layer
    probe(logits).sum().backward()
    assert probe.weight.grad is not None


@pytest.mark.parametrize("name", CONSTANT_STATE)
def test_inference_state_does_not_grow_with_the_context(name):
    model = _model(name)
    sizes = set()
    for prompt_len in (W + 3, 7 * W + 1):
        _, cache = _prefill_and_step(model, torch.randint(0, 256, (1, prompt_len + W)), prompt_len)
        sizes.add(cache.nbytes())
    assert len(sizes) == 1
    _, short = _prefill_and_step(_model("transformer"), torch.randint(0, 256, (1, 2 * W)), W)
    _, long = _prefill_and_step(_model("transformer"), torch.randint(0, 256, (1, 20 * W)), W)
    assert long.nbytes() > short.nbytes()   # full attention's keys/values do grow


def test_prefill_into_a_used_cache_continues_the_sequence():
    model = _model("bst-sh-s4")
    tokens = torch.randint(0, 256, (2, 4 * W + 3))
    cache = model.allocate_inference_cache(2)
    first = model.prefill(tokens[:, :W + 2], cache)
    rest = model.prefill(tokens[:, W + 2:], cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), model(tokens), atol=1e-4, rtol=0)


def test_selected_rows_continue_like_their_source_rows():
    model = _model("bst-mf-s4")
    tokens = torch.randint(0, 256, (2, 2 * W + 5))
    cache = model.allocate_inference_cache(2)
    model.prefill(tokens[:, :W + 7], cache)
    picked = cache.select([1, 1, 0])
    for t in range(W + 7, tokens.shape[1]):
        a = model.step(tokens[:, t], cache)
        b = model.step(tokens[[1, 1, 0], t], picked)
        torch.testing.assert_close(b, a[[1, 1, 0]], atol=1e-5, rtol=0)


def test_bad_cache_use_is_refused():
    model = _model("bst-sh-s4")
    cache = model.allocate_inference_cache(2)
    with pytest.raises(ValueError, match="rows"):
        model.prefill(torch.zeros(3, 4, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="allocate_inference_cache"):
        model.step(torch.zeros(2, dtype=torch.long), _model("slide").allocate_inference_cache(2))
    with pytest.raises(ValueError, match="vocab_size"):
        model.step(torch.tensor([1, 999]), cache)
    with pytest.raises(ValueError, match="one token per row"):
        model.step(torch.zeros(2, 3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="batch"):
        model.allocate_inference_cache(0)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_equals_greedy_full_forward(name):
    model = _model(name)
    prompt = torch.randint(0, 256, (W + 3,)).tolist()
    out = model.generate([prompt], 2 * W, temperature=0)[0]
    assert out == greedy_by_full_forward(model, prompt, 2 * W)


@pytest.mark.parametrize("name", ["bst-sh-s4", "bst-mf-s4", "gss-hybrid", "brt", "samba"])
def test_batched_prompts_of_different_lengths_match_single_generation(name):
    model = _model(name)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, W, 5, 2 * W + 1, 1)]
    batched = model.generate(prompts, 10, temperature=0)
    assert [len(p) for p in batched] == [15, W + 10, 15, 2 * W + 11, 11]
    for prompt, out in zip(prompts, batched, strict=True):
        assert out[:len(prompt)] == prompt
        assert out == model.generate([prompt], 10, temperature=0)[0]
        assert out == greedy_by_full_forward(model, prompt, 10)


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


def test_top_k_keeps_exactly_k_and_top_p_the_smallest_nucleus():
    from blockstate.generate import filter_logits

    probs = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])
    logits = probs.log()
    kept = lambda out: set(torch.isfinite(out[0]).nonzero().flatten().tolist())  # noqa: E731
    assert kept(filter_logits(logits, 2, None)) == {1, 3}
    assert kept(filter_logits(logits, 3, None)) == {1, 2, 3}
    assert kept(filter_logits(logits, None, 0.5)) == {1}            # 0.5 reaches 0.5
    assert kept(filter_logits(logits, None, 0.6)) == {1, 3}         # 0.5 < 0.6 <= 0.8
    assert kept(filter_logits(logits, None, 0.85)) == {1, 2, 3}
    assert kept(filter_logits(logits, 2, 0.3)) == {1}
    assert kept(filter_logits(logits, None, None)) == {0, 1, 2, 3, 4}
    # and sampling draws only from what is kept
    model = _model("bst-sh-s4")
    outs = model.generate([[1, 2, 3]] * 6, 30, temperature=2.0, top_k=1, seed=3)
    assert outs == model.generate([[1, 2, 3]] * 6, 30, temperature=0)
