"""TorchTitan 0.2.2's own trainer on our recipes' model and data, for throughput baselines.

``python -m torchtitan.train ... --experimental.custom_import torchtitan_ext.tools.titan_baseline``
imports this module at the start of TorchTitan's ``Trainer.__init__``
(``torchtitan/train.py`` at v0.2.2), before it builds the tokenizer, the data loader and the
model. Importing it:

- registers our flavors (``1.2B``, the CPU ones) in TorchTitan's Llama 3 registry
  (``import torchtitan_ext.models``);
- registers the corpus ``python_stdlib`` (the Python standard library's source, what our
  recipes train on without a download) in TorchTitan's ``DATASETS`` table, as a Hugging Face
  ``Dataset`` of ``{"text": ...}`` rows;
- gives the ``llama3`` train spec our byte-level tokenizer (``ByteTokenizer``: no files).

Nothing of torchtitan_ext's trainer runs: the step, parallelisms and kernels are TorchTitan's,
so ``scripts/gpu_check.py``'s ``tokens_per_s`` check compares the two trainers on one recipe.
Used by that check only; nothing in the runtime imports it.
"""

import dataclasses
from typing import Any

from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS
from torchtitan.protocols import train_spec as train_spec_module

import torchtitan_ext.models  # noqa: F401  (registers the flavors)
from torchtitan_ext.data.corpus import EMBEDDED_DATASET, python_stdlib_documents
from torchtitan_ext.data.tokenizer import ByteTokenizer


def _load_python_stdlib(path: str) -> Any:
    """The embedded corpus as a Hugging Face ``Dataset`` (``path`` is unused: the corpus is
    the running Python's standard library)."""
    from datasets import Dataset

    return Dataset.from_list([{"text": doc} for doc in python_stdlib_documents()])


def _byte_tokenizer(job_config: Any) -> ByteTokenizer:
    return ByteTokenizer()


def register() -> None:
    """Register the corpus and the tokenizer with TorchTitan (idempotent)."""
    DATASETS.setdefault(
        EMBEDDED_DATASET,
        DatasetConfig(
            path=EMBEDDED_DATASET, loader=_load_python_stdlib, sample_processor=lambda s: s["text"]
        ),
    )
    spec = train_spec_module.get_train_spec("llama3")
    if spec.build_tokenizer_fn is not _byte_tokenizer:
        # A user train spec takes precedence over the built-in one of the same name.
        train_spec_module.register_train_spec(
            "llama3", dataclasses.replace(spec, build_tokenizer_fn=_byte_tokenizer)
        )


register()
