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
from torchtitan_ext.data.tokenizer import ByteTokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "GlobalBatchLoader",
    "PackedWindows",
    "build_tokenizer",
    "load_documents",
    "long_documents",
    "python_stdlib_documents",
    "split_documents",
    "tokenize",
    "tokenize_with_offsets",
]
