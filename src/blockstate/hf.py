"""Hugging Face `transformers` classes for blockstate models (optional: `pip install blockstate[hf]`).

An export (`BlockStateLM.save_pretrained` or `blockstate export`; layout in
`blockstate.pretrained`) carries its own modeling code and an `auto_map`, so plain `transformers`
loads it, locally or from the Hub, without blockstate installed:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("exported-dir-or-repo", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("exported-dir-or-repo", trust_remote_code=True)

(the classes then come from the export's `modeling_blockstate.py`, a copy of
`blockstate.hf_modeling`). Importing this module instead registers the installed classes,
`BlockStateConfig` with `AutoConfig` and `BlockStateForCausalLM` with `AutoModelForCausalLM` under
model_type "blockstate", which load the same directories (and exports written before the remote
code) without `trust_remote_code`:

    import blockstate.hf  # noqa: F401  (registers the classes)
    model = AutoModelForCausalLM.from_pretrained("exported-dir")

Either way the model gives the same logits as `blockstate.load`, and `generate()` the same tokens
as blockstate's own `generate` for greedy decoding and for sampling with the same seed
(`torch.manual_seed(seed)` before `generate`, the same temperature, top_k and top_p, and
`top_k=0` where blockstate's has none: `transformers` applies top_k=50 unless told; tested at
top_p 0.5 and 0.9, though the two nucleus filters could part at exact ties): it runs on
blockstate's one-token inference cache (`BlockStateCache`, a `transformers` `Cache` around
`blockstate.cache.InferenceCache`), prefilling the prompt once and then costing one step per
token. Beam search reorders the cache's rows. Batches of prompts of different lengths are
accepted left-padded (`attention_mask` zeros first in each row; the export's
tokenizer pads on the left): each row then runs through a cache of its own and equals generating
it alone; any other mask is refused, naming blockstate's own `generate`. `use_cache=False`
recomputes the whole sequence per token (exact, slow). Not supported: assisted decoding (the cache
cannot be cropped), `inputs_embeds`.

Tokenizers. The export's `tokenizer.json` is in the `tokenizers` library's format, so
`AutoTokenizer` gives a fast tokenizer without custom code (`blockstate.tokenizer_export`: the
same ids as blockstate's tokenizer for any text, except a literal U+2581, and special-token text
for unigram models). `BlockStateTokenizer` wraps blockstate's own tokenizer (the export's
`blockstate_tokenizer.json`, or `tokenizer/` in older exports) behind the `transformers` tokenizer
interface, with exactly blockstate's ids; `AutoTokenizer` picks it for older exports once this
module is imported. Its token strings are the SentencePiece pieces, or "<0xNN>" for bytes;
`add_special_tokens` adds nothing (blockstate prepends BOS itself where it scores or generates).

Hub: `BlockStateLM.from_pretrained("owner/name")` and `blockstate.load("owner/name")` download
with `huggingface_hub`; `BlockStateLM.push_to_hub(repo_id, tokenizer)` and `blockstate export RUN
DIR --push-to-hub REPO_ID` upload a complete export. `BlockStateForCausalLM.save_pretrained` /
`push_to_hub` (transformers' own) write transformers' layout instead: weights under "model."
(`blockstate.load` reads them), no tokenizer, no model card, and the modeling code only when the
model was itself loaded as remote code.
"""

from __future__ import annotations

try:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("blockstate.hf needs the `transformers` package: pip install "
                      "'blockstate[hf]'") from e

from .hf_config import MODEL_TYPE, BlockStateConfig
from .hf_modeling import BlockStateCache, BlockStateForCausalLM
from .pretrained import BLOCKSTATE_TOKENIZER_FILE, TOKENIZER_DIR


class BlockStateTokenizer(PreTrainedTokenizer):
    """blockstate's tokenizer (blockstate_tokenizer.json and, for SentencePiece, tokenizer.model
    beside the model; tokenizer/ in older exports) behind the `transformers` tokenizer interface;
    see the module docstring."""

    vocab_files_names = {"blockstate_tokenizer": BLOCKSTATE_TOKENIZER_FILE,
                         "sentencepiece_model": "tokenizer.model",
                         "legacy_tokenizer": f"{TOKENIZER_DIR}/tokenizer.json",
                         "legacy_sentencepiece_model": f"{TOKENIZER_DIR}/tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, blockstate_tokenizer: str | None = None, sentencepiece_model=None,
                 legacy_tokenizer: str | None = None, legacy_sentencepiece_model=None, **kwargs):
        from pathlib import Path

        from .data import load_tokenizer

        if blockstate_tokenizer is not None and Path(blockstate_tokenizer).is_file():
            path = Path(blockstate_tokenizer)
            self.inner = load_tokenizer(path.parent, config_name=path.name)
        elif legacy_tokenizer is not None and Path(legacy_tokenizer).is_file():
            self.inner = load_tokenizer(Path(legacy_tokenizer).parent)
        else:
            raise ValueError("BlockStateTokenizer needs the blockstate_tokenizer.json (or "
                             "tokenizer/ directory) of a model saved by blockstate's "
                             "save_pretrained with its tokenizer")
        special = {self.inner.pad_id: "<pad>", self.inner.bos_id: "<s>", self.inner.eos_id: "</s>"}
        self._tokens = [special.get(i) or self._token_of(i) for i in range(self.inner.vocab_size)]
        self._ids = {token: i for i, token in enumerate(self._tokens)}
        for name, index in (("pad_token", self.inner.pad_id), ("bos_token", self.inner.bos_id),
                            ("eos_token", self.inner.eos_id)):
            kwargs.setdefault(name, self._tokens[index])
        super().__init__(**kwargs)

    def _token_of(self, index: int) -> str:
        """The token string of a non-special id: "<0xNN>" for a byte, else the SentencePiece piece."""
        if self.inner.kind == "byte":
            return f"<0x{index:02X}>"
        return self.inner.piece(index)

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return dict(self._ids)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._tokens[i] for i in self.inner.encode(text)]

    def _convert_token_to_id(self, token: str) -> int:
        return self._ids[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self._tokens[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.inner.decode([self._ids[t] for t in tokens])

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return list(token_ids_0) + list(token_ids_1 or [])

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        from pathlib import Path

        directory = Path(save_directory)
        self.inner.save(directory, config_name=BLOCKSTATE_TOKENIZER_FILE)
        saved = [directory / BLOCKSTATE_TOKENIZER_FILE]
        if self.inner.kind != "byte":
            saved.append(directory / "tokenizer.model")
        return tuple(str(path) for path in saved)


AutoConfig.register(MODEL_TYPE, BlockStateConfig, exist_ok=True)
AutoModelForCausalLM.register(BlockStateConfig, BlockStateForCausalLM, exist_ok=True)
AutoTokenizer.register(BlockStateConfig, slow_tokenizer_class=BlockStateTokenizer, exist_ok=True)

__all__ = ["BlockStateCache", "BlockStateConfig", "BlockStateForCausalLM", "BlockStateTokenizer",
           "transformers"]
