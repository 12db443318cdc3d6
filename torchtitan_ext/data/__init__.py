"""Data: corpora, tokenizers and the mesh-independent global-batch loader."""

from torchtitan_ext.data.corpus import load_documents, python_stdlib_documents
from torchtitan_ext.data.loader import (
    GlobalBatchLoader,
    PackedWindows,
    long_documents,
    split_documents,
    tokenize,
    tokenize_with_offsets,
)
from torchtitan_ext.data.prepared import PreparedCorpus, is_prepared, open_prepared
from torchtitan_ext.data.stream import Tokens, TokenStream
from torchtitan_ext.data.tokenizer import ByteTokenizer, build_tokenizer, tokenizer_identity

__all__ = [
    "ByteTokenizer",
    "GlobalBatchLoader",
    "PackedWindows",
    "PreparedCorpus",
    "TokenStream",
    "Tokens",
    "build_tokenizer",
    "is_prepared",
    "load_documents",
    "long_documents",
    "open_prepared",
    "python_stdlib_documents",
    "split_documents",
    "tokenize",
    "tokenize_with_offsets",
    "tokenizer_identity",
]
