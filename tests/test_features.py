"""Trainer features on 1 rank: activation checkpointing and compile leave the numerics alone,
the Hugging Face tokenizer path trains, and unsupported TorchTitan settings are rejected."""

import argparse
import json
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_metrics, tiny_run_args, train_single
from torchtitan_ext.config import ConfigError, load_config
from torchtitan_ext.data.tokenizer import build_tokenizer, encode_document
from torchtitan_ext.validate import check_trainer_support

DEBUG_CPU = str(ROOT / "train_configs" / "debug_cpu.toml")
AC = "--activation_checkpoint.mode"
SAC_OPTION = "--activation_checkpoint.selective_ac_option"


def short_run(dump: Path, *extra: str, steps: int = 3) -> list[dict]:
    train_single(
        [
            *tiny_run_args(dump, steps, warmup_steps=20),
            *("--checkpoint.no-enable", "--metrics.no-enable-tensorboard", *extra),
        ]
    )
    return read_metrics(dump)


@pytest.fixture(scope="module")
def no_ac(tmp_path_factory) -> list[dict]:
    return short_run(tmp_path_factory.mktemp("none"), "--activation_checkpoint.mode", "none")


@pytest.mark.parametrize(
    "ac",
    [
        [AC, "full"],
        [AC, "selective", SAC_OPTION, "op"],
        [AC, "selective", SAC_OPTION, "1"],
    ],
    ids=["full", "selective-op", "selective-1"],
)  # fmt: skip
def test_activation_checkpointing_keeps_numerics(no_ac, tmp_path, ac):
    records = short_run(tmp_path, *ac)
    for got, ref in zip(records, no_ac, strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=0)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6, abs=0)


def test_chunked_loss_keeps_numerics(no_ac, tmp_path):
    """Chunks of 24 of the 2 x 64 tokens (the last one 8): the same losses and gradient norms
    as the unchunked loss."""
    records = short_run(tmp_path, "--training.loss_chunk_tokens", "24")
    for got, ref in zip(records, no_ac, strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=0)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6, abs=0)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        [AC, "full"],
        ["--compile.enable"],
    ],
    ids=["plain", "full-ac", "compile"],
)  # fmt: skip
def test_tiled_mlp_keeps_numerics(no_ac, tmp_path, extra):
    """Tiles of 24 of the 64 tokens (the last one 16), also inside full AC and a compiled
    block: the same losses and gradient norms as the untiled feed-forward."""
    records = short_run(tmp_path, "--training.mlp_tile_tokens", "24", *extra)
    rel = 1e-4 if "--compile.enable" in extra else 1e-6  # compile reorders float math
    for got, ref in zip(records, no_ac, strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=rel, abs=0)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=rel, abs=0)


def test_compile_keeps_numerics(no_ac, tmp_path):
    records = short_run(tmp_path, "--activation_checkpoint.mode", "none", "--compile.enable")
    for got, ref in zip(records, no_ac, strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-3)


def _write_hf_tokenizer(folder: Path) -> None:
    """A small byte-level BPE trained here with Hugging Face ``tokenizers`` (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Trained on files of the corpus the run reads (python_stdlib), not on our own sources, so
    # the merges, and the losses below, do not move when the project's code changes.
    sources = (textwrap.__file__, argparse.__file__)
    text = [line for src in sources for line in Path(src).read_text().splitlines()]
    tok.train_from_iterator(text, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    )


def test_hf_tokenizer_json_trains(tmp_path):
    assets = tmp_path / "tokenizer"
    _write_hf_tokenizer(assets)
    cfg = load_config(["--model.tokenizer", "hf", "--model.hf_assets_path", str(assets)])
    tok = build_tokenizer(cfg)
    ids = encode_document(tok, "def main():\n    return 0\n")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:-1].tolist()) == "def main():\n    return 0\n"
    records = short_run(
        tmp_path / "run",
        *("--model.tokenizer", "hf", "--model.hf_assets_path", str(assets)),
        *("--lr_scheduler.warmup_steps", "2"),
        steps=16,
    )
    # Single steps are noisy at this batch (+-0.2); the mean of four drops by about 0.7.
    losses = [r["loss"] for r in records]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.4, losses


def test_hf_tokenizer_missing_is_a_config_error(tmp_path):
    cfg = load_config(["--model.tokenizer", "hf", "--model.hf_assets_path", str(tmp_path)])
    with pytest.raises(ConfigError, match=r"no tokenizer\.json there"):
        build_tokenizer(cfg)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["--model.converters", "quantize.linear.mx"], "model.converters"),
        (["--checkpoint.async_mode", "async_with_pinned_mem"], "checkpoint.async_mode"),
        (
            ["--parallelism.pipeline_parallel_schedule_csv", "schedule.csv"],
            "parallelism.pipeline_parallel_schedule_csv",
        ),
        (["--validation.dataset", "wikitext"], "validation.dataset"),  # was silently ignored
    ],
)
def test_unsupported_titan_settings_are_rejected(override, key):
    cfg = load_config(["--job.config_file", DEBUG_CPU, *override])
    with pytest.raises(ConfigError, match="not supported by torchtitan_ext's trainer") as err:
        check_trainer_support(cfg)
    assert err.value.key == key
