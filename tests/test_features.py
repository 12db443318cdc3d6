"""Trainer features on 1 rank: activation checkpointing and compile leave the numerics alone,
the Hugging Face tokenizer path trains, and unsupported TorchTitan settings are rejected."""

import argparse
import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_metrics, tiny_run_args, train_single_many
from torchtitan_ext.config import ConfigError, load_config
from torchtitan_ext.data.tokenizer import build_tokenizer, encode_document
from torchtitan_ext.validate import check_trainer_support

DEBUG_CPU = str(ROOT / "train_configs" / "debug_cpu.toml")
AC = "--activation_checkpoint.mode"
SAC_OPTION = "--activation_checkpoint.selective_ac_option"


def short_run_args(dump: Path, *extra: str, steps: int = 3) -> list[str]:
    return [
        *tiny_run_args(dump, steps, warmup_steps=20),
        *("--checkpoint.no-enable", "--metrics.no-enable-tensorboard", *extra),
    ]


HF = "hf-tokenizer"
RUNS: dict[str, list[str]] = {
    "none": [AC, "none"],
    "full": [AC, "full"],
    "selective-op": [AC, "selective", SAC_OPTION, "op"],
    "selective-1": [AC, "selective", SAC_OPTION, "1"],
    "chunked-loss": ["--training.loss_chunk_tokens", "24"],
    "tiled-plain": ["--training.mlp_tile_tokens", "24"],
    "tiled-full-ac": ["--training.mlp_tile_tokens", "24", AC, "full"],
    "tiled-compile": ["--training.mlp_tile_tokens", "24", "--compile.enable"],
    "compile": [AC, "none", "--compile.enable"],
}
"""The short runs of this module's tests by name: 3 steps each, 1 rank."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Every run of ``RUNS`` and the Hugging Face tokenizer run (``HF``, 16 steps on the
    tokenizer in ``<tmp>/tokenizer``) in turn in one process (``train_single_many``: one
    process start instead of ten); each test checks its own run's exit status."""
    tmp = tmp_path_factory.mktemp("features")
    assets = tmp / "tokenizer"
    _write_hf_tokenizer(assets)
    hf = ("--model.tokenizer", "hf", "--model.hf_assets_path", str(assets))
    args = {name: short_run_args(tmp / name, *extra) for name, extra in RUNS.items()}
    args[HF] = short_run_args(tmp / HF, *hf, "--lr_scheduler.warmup_steps", "2", steps=16)
    procs = train_single_many(list(args.values()), check=False)
    return {name: (proc, tmp / name) for name, proc in zip(args, procs, strict=True)}


def records_of(runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]], name: str):
    proc, dump = runs[name]
    assert proc.returncode == 0, (name, proc.stdout[-3000:], proc.stderr[-3000:])
    return read_metrics(dump)


@pytest.mark.parametrize("ac", ["full", "selective-op", "selective-1"])
def test_activation_checkpointing_keeps_numerics(runs, ac):
    records, no_ac = records_of(runs, ac), records_of(runs, "none")
    for got, ref in zip(records, no_ac, strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=0)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6, abs=0)


def test_chunked_loss_keeps_numerics(runs):
    """Chunks of 24 of the 2 x 64 tokens (the last one 8): the same losses and gradient norms
    as the unchunked loss."""
    records, no_ac = records_of(runs, "chunked-loss"), records_of(runs, "none")
    for got, ref in zip(records, no_ac, strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=0)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6, abs=0)


@pytest.mark.parametrize("name", ["tiled-plain", "tiled-full-ac", "tiled-compile"])
def test_tiled_mlp_keeps_numerics(runs, name):
    """Tiles of 24 of the 64 tokens (the last one 16), also inside full AC and a compiled
    block: the same losses and gradient norms as the untiled feed-forward."""
    records, no_ac = records_of(runs, name), records_of(runs, "none")
    rel = 1e-4 if "--compile.enable" in RUNS[name] else 1e-6  # compile reorders float math
    for got, ref in zip(records, no_ac, strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=rel, abs=0)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=rel, abs=0)


def test_compile_keeps_numerics(runs):
    records, no_ac = records_of(runs, "compile"), records_of(runs, "none")
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


def test_hf_tokenizer_json_trains(runs):
    assets = runs[HF][1].parent / "tokenizer"
    cfg = load_config(["--model.tokenizer", "hf", "--model.hf_assets_path", str(assets)])
    tok = build_tokenizer(cfg)
    ids = encode_document(tok, "def main():\n    return 0\n")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:-1].tolist()) == "def main():\n    return 0\n"
    records = records_of(runs, HF)
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
