"""The data layer: corpora with deterministic splits, tokenizers, cached tokenized splits, packed
training windows and a resumable batch stream."""

from .corpora import (
    SPLITS,
    Corpus,
    CorpusError,
    DirectoryCorpus,
    Document,
    HfCorpus,
    JsonlCorpus,
    KjvCorpus,
    LatexCorpus,
    StdlibCorpus,
    TextFileCorpus,
    list_corpora,
    resolve_corpus,
    split_of,
)
from .dataset import (
    IGNORE_INDEX,
    BatchStream,
    PackedSequences,
    SegmentStream,
    TokenizedSplit,
    default_cache_dir,
    token_dtype,
    tokenize_split,
)
from .tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    build_tokenizer,
    load_tokenizer,
    train_sentencepiece,
)

__all__ = [
    "IGNORE_INDEX", "SPLITS", "BatchStream", "ByteTokenizer", "Corpus", "CorpusError", "DirectoryCorpus",
    "Document", "HfCorpus", "JsonlCorpus", "KjvCorpus", "LatexCorpus", "PackedSequences", "SegmentStream",
    "SentencePieceTokenizer", "StdlibCorpus", "TextFileCorpus", "TokenizedSplit", "Tokenizer",
    "TokenizerError", "build_tokenizer", "default_cache_dir", "list_corpora", "load_tokenizer",
    "resolve_corpus", "split_of", "token_dtype", "tokenize_split", "train_sentencepiece",
]
