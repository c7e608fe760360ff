"""The optional Hugging Face `transformers` integration (blockstate.hf)."""

import pytest
import torch

import blockstate
from blockstate import build_model

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import blockstate.hf  # noqa: E402,F401  (registers the Auto classes)


@pytest.mark.parametrize("name,tie", [("bst-sh-s4", True), ("bst-mf-s4", True), ("brt", True),
                                      ("bst-sh-ssd", False), ("samba", True),
                                      ("bst-recommended", False)])
def test_auto_model_gives_blockstate_logits_loss_and_greedy_tokens(name, tie, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, "tiny", init_std=0.1, tie_embeddings=tie).eval()  # logits of O(1)
    model.save_pretrained(tmp_path / "m")
    assert AutoConfig.from_pretrained(tmp_path / "m").to_model_config() == model.config
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(hf, blockstate.hf.BlockStateForCausalLM)
    assert hf.config.tie_word_embeddings is tie
    tokens = torch.randint(0, 256, (2, 37))
    out = hf(tokens, labels=tokens)
    torch.testing.assert_close(out.logits, model(tokens), rtol=0, atol=1e-6)
    expected = torch.nn.functional.cross_entropy(model(tokens)[:, :-1].flatten(0, 1),
                                                 tokens[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    greedy = hf.generate(tokens, max_new_tokens=12, do_sample=False)
    assert greedy.tolist() == model.generate(tokens, 12, temperature=0)
    # transformers' own save (weights under "model.") loads back into blockstate
    hf.save_pretrained(tmp_path / "hf")
    again, _ = blockstate.load(tmp_path / "hf")
    assert torch.equal(again(tokens), model(tokens))


def test_masks_other_than_left_padding_are_refused(tmp_path):
    build_model("bst-sh-s4", "tiny").save_pretrained(tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tokens = torch.ones(2, 5, dtype=torch.long)
    hf(tokens, attention_mask=torch.ones(2, 5))                  # masks nothing: fine
    with pytest.raises(ValueError, match="padding"):
        hf(tokens, attention_mask=torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="padding"):
        hf(tokens, attention_mask=torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))


TEXTS = ["def f(x):\n    return x ** 2  # square", "naïve café — ünïcode ✓", "", "  leading spaces",
         "a   b  c\t\td\n\n  e ", "trailing   ", "<s> and </s> are text"]


@pytest.mark.parametrize("kind", ["byte", "bpe", "unigram"])
def test_export_tokenizers_give_blockstate_ids_and_text(kind, tmp_path):
    """The export's tokenizer.json (the `tokenizers` library's format) loads through AutoTokenizer
    without custom code, and blockstate_tokenizer.json through BlockStateTokenizer: both with the
    same ids and text as blockstate's own; BlockStateTokenizer survives transformers'
    save_pretrained."""
    from transformers import AutoTokenizer

    from blockstate.data import ByteTokenizer, DirectoryCorpus, train_sentencepiece

    if kind == "byte":
        tokenizer = ByteTokenizer()
    else:
        docs = tmp_path / "docs"
        docs.mkdir()
        for i in range(40):
            (docs / f"{i}.txt").write_text(f"document {i}: " + " ".join(TEXTS) * 3)
        tokenizer = train_sentencepiece(DirectoryCorpus(docs), 400 if kind == "bpe" else 310,
                                        tmp_path / "spm", model_type=kind)
    model = build_model("bst-sh-s4", "tiny", vocab_size=tokenizer.vocab_size)
    model.save_pretrained(tmp_path / "m", tokenizer)
    fast = AutoTokenizer.from_pretrained(tmp_path / "m")
    slow = blockstate.hf.BlockStateTokenizer.from_pretrained(tmp_path / "m")
    for hf_tok in (fast, slow):
        assert len(hf_tok) == tokenizer.vocab_size
        assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
            tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        for text in TEXTS + [" ".join(TEXTS) * 2]:
            if kind == "unigram" and hf_tok is fast and "<s>" in text:
                continue          # the one difference (see blockstate.tokenizer_export)
            ids = hf_tok(text)["input_ids"]
            assert ids == tokenizer.encode(text), (type(hf_tok).__name__, text)
            assert hf_tok.decode(ids) == text == tokenizer.decode(ids)
    slow.save_pretrained(tmp_path / "saved")
    again = blockstate.hf.BlockStateTokenizer.from_pretrained(tmp_path / "saved")
    assert again(TEXTS[1])["input_ids"] == tokenizer.encode(TEXTS[1])
