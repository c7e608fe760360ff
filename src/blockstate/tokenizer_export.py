"""blockstate's tokenizers in the `tokenizers` library's format (an export's tokenizer.json), so
that `transformers.AutoTokenizer` loads them without custom code.

- byte: a BPE model without merges whose vocabulary is the 256 byte tokens "<0xNN>" (byte
  fallback turns every character into its UTF-8 bytes), then "<pad>", "<s>", "</s>".
- SentencePiece (BPE or unigram, trained by `blockstate.data.train_sentencepiece`): the same
  pieces, scores and byte fallback; BPE merges from the pieces (a piece's id is its merge's rank);
  spaces become U+2581 and the text is split before every run of them, as SentencePiece splits it
  with whitespace-only pieces allowed; newline and tab are the user-defined pieces.

Both give blockstate's ids for any text, with two exceptions: a literal U+2581 in the text, which
blockstate encodes as its three bytes and the `tokenizers` library reads as a space; and, for
unigram models only, the text of a special piece ("<s>", "</s>", "<pad>", "<unk>"), which the
`tokenizers` library's unigram model may read as that piece (SentencePiece never does). Special
tokens written in the text are otherwise encoded as text (`split_special_tokens`), and nothing
is added around the ids, as in blockstate.
"""

from __future__ import annotations

import json
from typing import Any

_SPACE_MARKER = "\u2581"


def _specials(tokenizer) -> dict[str, int]:
    if tokenizer.kind == "byte":
        return {"<pad>": tokenizer.pad_id, "<s>": tokenizer.bos_id, "</s>": tokenizer.eos_id}
    piece = tokenizer.piece
    return {piece(i): i for i in sorted({0, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id})}


def tokenizers_json(tokenizer) -> str:
    """The `tokenizers` library's tokenizer.json of a blockstate tokenizer (needs `tokenizers`)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    if tokenizer.kind == "byte":
        vocab = {f"<0x{i:02X}>": i for i in range(256)}
        vocab.update({name: i for name, i in _specials(tokenizer).items()})
        model = models.BPE(vocab=vocab, merges=[], byte_fallback=True)
        hf = Tokenizer(model)
        hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        user_defined: list[str] = []
    else:
        processor = tokenizer._processor
        pieces = [(processor.id_to_piece(i), processor.get_score(i))
                  for i in range(tokenizer.vocab_size)]
        if tokenizer.model_type == "bpe":
            vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
            merges = []
            for piece, index in vocab.items():
                if processor.is_byte(index) or processor.is_control(index):
                    continue
                merges += [(index, vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
                           for k in range(1, len(piece))
                           if piece[:k] in vocab and piece[k:] in vocab]
            model = models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in sorted(merges)],
                               unk_token=processor.id_to_piece(0), byte_fallback=True,
                               fuse_unk=True)
        else:
            model = models.Unigram(pieces, unk_id=0, byte_fallback=True)
        hf = Tokenizer(model)
        hf.normalizer = normalizers.Replace(" ", _SPACE_MARKER)
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(f"{_SPACE_MARKER}*[^{_SPACE_MARKER}]+|"
                                                      f"{_SPACE_MARKER}+"), behavior="isolated")
        hf.decoder = decoders.Sequence([decoders.Replace(_SPACE_MARKER, " "),
                                        decoders.ByteFallback(), decoders.Fuse()])
        user_defined = [text for text in ("\n", "\t") if processor.piece_to_id(text) != 0]
    hf.add_tokens([AddedToken(text, normalized=False, special=False) for text in user_defined])
    hf.add_special_tokens([AddedToken(name, normalized=False, special=True)
                           for name in _specials(tokenizer)])
    return hf.to_str(pretty=True)


def tokenizer_config(tokenizer, max_length: int | None = None) -> dict[str, Any]:
    """tokenizer_config.json for the tokenizer.json above."""
    names = {i: name for name, i in _specials(tokenizer).items()}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names[tokenizer.bos_id], "eos_token": names[tokenizer.eos_id],
        "pad_token": names[tokenizer.pad_id],
        "add_bos_token": False, "add_eos_token": False, "split_special_tokens": True,
        "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"],
        "padding_side": "left",
    }
    if tokenizer.kind != "byte":
        config["unk_token"] = names[0]
    if max_length:
        config["model_max_length"] = max_length
    return config


def tokenizer_config_json(tokenizer, max_length: int | None = None) -> str:
    return json.dumps(tokenizer_config(tokenizer, max_length), indent=2) + "\n"


__all__ = ["tokenizer_config", "tokenizer_config_json", "tokenizers_json"]
