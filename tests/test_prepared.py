"""Prepared corpora (``python -m torchtitan_ext.data.prepare``): the shards hold exactly the
in-memory token stream, the loader's global batches over them do not depend on the mesh, a run
trains from one and resumes exactly into another mesh, preparing resumes, and every damaged or
mismatched corpus is one config error naming its file."""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import read_metrics, tiny_run_args, torchrun
from tests.test_features import _write_hf_tokenizer
from torchtitan_ext.config import ConfigError
from torchtitan_ext.config.manager import load_config
from torchtitan_ext.data import (
    ByteTokenizer,
    GlobalBatchLoader,
    PackedWindows,
    TokenStream,
    build_tokenizer,
    long_documents,
    open_prepared,
    tokenize_with_offsets,
    tokenizer_identity,
)
from torchtitan_ext.data.prepare import main as prepare_main
from torchtitan_ext.metrics import read_metrics as read_metrics_of

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "train_configs" / "debug_cpu.toml")
BYTE = {"kind": "byte", "vocab_size": 258, "bos_id": 256, "eos_id": 257}


def _documents(n: int, seed: int = 0) -> list[str]:
    """``n`` documents of varied length (10 to ~2000 characters), some non-ASCII."""
    rng = np.random.default_rng(seed)
    words = ["def", "return", "λ", "class", "import", "naïve", "x", "\n", "    ", "é"]
    return [
        " ".join(rng.choice(words, size=int(rng.integers(3, 600)))) + f" #{i}" for i in range(n)
    ]


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    return path


def _prepare(source: Path | str, out: Path, *extra: str, check: bool = True) -> int:
    code = prepare_main(
        ["--source", str(source), "--out", str(out), "--job.config_file", RECIPE, *extra]
    )
    assert code == 0 or not check, code
    return code


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """A prepared corpus of 3 jsonl files (300 documents, 16 shards), and its documents in
    file order."""
    base = tmp_path_factory.mktemp("corpus")
    docs = _documents(300)
    for k in range(3):
        _write_jsonl(base / "src" / f"part{k}.jsonl", docs[k * 100 : (k + 1) * 100])
    _prepare(base / "src", base / "out", "--num-proc", "2")
    return base / "out", docs


def test_shards_hold_the_in_memory_stream(corpus):
    out, docs = corpus
    tokens, offsets = tokenize_with_offsets(docs, ByteTokenizer())
    prepared = open_prepared(str(out), BYTE)
    manifest = prepared.manifest
    assert manifest["dtype"] == "uint16" and len(manifest["shards"]) == 16
    assert manifest["documents"] == 300 and manifest["tokens"] == len(tokens)
    assert [Path(s["file"]).name for s in manifest["sources"]["files"]] == [
        "part0.jsonl",
        "part1.jsonl",
        "part2.jsonl",
    ]
    stream = prepared.stream
    assert len(stream) == len(tokens)
    np.testing.assert_array_equal(np.asarray(prepared.offsets), offsets)
    np.testing.assert_array_equal(stream[0 : len(stream)], tokens)
    # Slices across shard boundaries and at the ends, as numpy slices them.
    rng = np.random.default_rng(1)
    for a in [*rng.integers(0, len(tokens), 50), 0, len(tokens) - 3]:
        b = int(a) + int(rng.integers(0, 3000))
        np.testing.assert_array_equal(stream[int(a) : b], tokens[int(a) : b])
    # The split and a stage's long documents are views of the same tokens.
    train, train_offsets, val, n_val = prepared.split(0.1)
    assert n_val == 30 and len(train) + len(val) == len(tokens)
    np.testing.assert_array_equal(val[0 : len(val)], tokens[offsets[270] :])
    long_mem = long_documents(tokens[: offsets[270]], offsets[:271], 1500)
    long_map = long_documents(train, np.asarray(train_offsets), 1500)
    assert isinstance(long_map, TokenStream) and 0 < len(long_map) < len(train)
    np.testing.assert_array_equal(long_map[0 : len(long_map)], long_mem)


def test_global_batch_from_shards_does_not_depend_on_mesh(corpus):
    """dp 1 x 4 microbatches and dp 2 x 2 over the memory-mapped stream give the in-memory
    stream's global batches, and a dp 4 loader resumes from the dp 1 one's state."""
    out, docs = corpus
    tokens, _ = tokenize_with_offsets(docs, ByteTokenizer())
    stream = open_prepared(str(out), BYTE).stream

    def steps(tok, dp: int, accum: int, n: int, state=None) -> list[np.ndarray]:
        loaders = [
            GlobalBatchLoader(PackedWindows(tok, 64, seed=3), 2, r, dp, accum) for r in range(dp)
        ]
        if state is not None:
            for loader in loaders:
                loader.load_state_dict(state)
        out_steps = []
        for _ in range(n):
            per_rank = [loader.next_step() for loader in loaders]
            # global order: microbatch m of rank r holds indices m*B*dp + r*B
            batch = [per_rank[r][m][0] for m in range(accum) for r in range(dp)]
            out_steps.append(np.concatenate([b.numpy() for b in batch]))
        return out_steps

    reference = steps(tokens, 1, 4, 5)
    for dp, accum in [(1, 4), (2, 2)]:
        for a, b in zip(reference, steps(stream, dp, accum, 5), strict=True):
            np.testing.assert_array_equal(a, b)
    first = GlobalBatchLoader(PackedWindows(stream, 64, seed=3), 2, 0, 1, 4)
    for _ in range(3):
        first.next_step()
    resumed = steps(stream, 4, 1, 2, state=first.state_dict())
    for a, b in zip(reference[3:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_hub_path_streams_a_local_dataset_folder(corpus, tmp_path):
    """``--hub`` streams a dataset folder through ``datasets.load_dataset(folder)`` (what a
    hub name does after download) into the same tokens, one shard per file."""
    _, docs = corpus
    folder = tmp_path / "ds"
    _write_jsonl(folder / "data" / "train-00000.jsonl", docs[:150])
    _write_jsonl(folder / "data" / "train-00001.jsonl", docs[150:])
    _prepare(folder, tmp_path / "out", "--hub", "--num-proc", "2")
    prepared = open_prepared(str(tmp_path / "out"), BYTE)
    tokens, _ = tokenize_with_offsets(docs, ByteTokenizer())
    assert len(prepared.manifest["shards"]) == 2
    assert prepared.manifest["sources"]["hub"] == str(folder)
    np.testing.assert_array_equal(prepared.stream[0 : len(tokens)], tokens)


def test_prepare_resumes_and_never_leaves_a_complete_looking_corpus(tmp_path, capsys):
    docs = _documents(64, seed=2)
    src = _write_jsonl(tmp_path / "a.jsonl", docs)
    out = tmp_path / "out"
    _prepare(src, out, "--num-proc", "1")
    manifest = (out / "manifest.json").read_text()
    # A run stopped after some shards: no manifest, shard 5 unfinished (a temporary file and
    # no marker). The folder is refused for training, and the next run redoes shard 5 only.
    (out / "manifest.json").unlink()
    (out / "shards" / "00005.json").unlink()
    os.replace(out / "shards" / "00005.bin", out / "shards" / "00005.bin.tmp")
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.bin")}
    with pytest.raises(ConfigError, match=r"manifest\.json: no such file: an incomplete"):
        open_prepared(str(out), BYTE)
    _prepare(src, out, "--num-proc", "2")
    assert (out / "manifest.json").read_text() == manifest
    for name, mtime in kept.items():
        assert (out / "shards" / name).stat().st_mtime_ns == mtime, name
    assert not list((out / "shards").glob("*.tmp")) and not (out / ".cache").exists()
    # Run again: nothing to do. Changed source: refused, unless --overwrite.
    _prepare(src, out)
    assert "already prepared" in capsys.readouterr().out
    _write_jsonl(src, docs[:-1])
    assert _prepare(src, out, check=False) == 2
    assert "holds a corpus prepared with other sources" in capsys.readouterr().err
    _prepare(src, out, "--overwrite")
    assert open_prepared(str(out), BYTE).num_documents == 63


def test_prepare_help_and_bad_sources(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare_main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--source", "--out", "--num-proc", "--text-field", "--hub", "--overwrite"):
        assert flag in text
    assert "--job.config_file" in text
    bad = _write_jsonl(tmp_path / "bad.jsonl", ["ok"])
    with open(bad, "a") as f:
        f.write('{"text": null}\n')
    assert _prepare(bad, tmp_path / "o1", check=False) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"config error: data.text_field = 'text': {bad}: line 2: 'text' is null"), err
    (tmp_path / "x.csv").write_text("a")
    assert _prepare(tmp_path / "x.csv", tmp_path / "o2", check=False) == 2
    assert "--source" in capsys.readouterr().err


def test_damaged_or_mismatched_corpus_is_one_error_naming_the_file(corpus, tmp_path, capsys):
    src, _ = corpus
    out = tmp_path / "c"
    shutil.copytree(src, out)
    shard = out / "shards" / "00003.bin"
    # Another tokenizer than the recipe's.
    assets = tmp_path / "tok"
    _write_hf_tokenizer(assets)
    cfg = load_config(["--model.tokenizer", "hf", "--model.hf_assets_path", str(assets)])
    hf = tokenizer_identity(cfg, build_tokenizer(cfg))
    with pytest.raises(ConfigError, match=r"prepared with tokenizer 'byte' \(vocab 258\), but"):
        open_prepared(str(out), hf)
    # Same size, altered bytes: only the hash check (data.verify_corpus) sees it.
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    open_prepared(str(out), BYTE)
    with pytest.raises(ConfigError, match=re.escape(f"{shard}: its xxh3-64 differs")):
        open_prepared(str(out), BYTE, verify=True)
    verify = ["--out", str(out), "--verify", "--job.config_file", RECIPE]
    assert prepare_main(verify) == 2
    assert f"{shard}: its xxh3-64 differs" in capsys.readouterr().err
    assert prepare_main(["--out", str(src), "--verify", "--job.config_file", RECIPE]) == 0
    assert "intact: 300 documents" in capsys.readouterr().out
    # Truncated shard and document index; a missing shard.
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(ConfigError, match=re.escape(f"{shard}: {len(data) - 2} bytes, the")):
        open_prepared(str(out), BYTE)
    shard.unlink()
    with pytest.raises(ConfigError, match=re.escape(f"{shard}: cannot be read")):
        open_prepared(str(out), BYTE)
    shutil.copy(src / "shards" / "00003.bin", shard)
    index = out / "documents.npy"
    index.write_bytes(index.read_bytes()[:-8])
    with pytest.raises(ConfigError, match=re.escape(f"{index}: unreadable document index")):
        open_prepared(str(out), BYTE)
    with pytest.raises(ConfigError, match=r"training\.dataset_path = .*manifest\.json: no such"):
        open_prepared(str(tmp_path), BYTE)


def test_validation_dataset_path_replaces_the_held_out_fraction(corpus, tmp_path):
    """``validation.dataset_path``: a prepared corpus (all of it, memory-mapped) or local files
    (tokenized) is the validation split, and the training data keeps every document; a bad
    path is an error keyed by it."""
    from torchtitan_ext.trainer.setup import _load_data

    out, docs = corpus
    val_docs = _documents(20, seed=5)
    val_file = _write_jsonl(tmp_path / "val" / "v.jsonl", val_docs)
    _prepare(val_file, tmp_path / "val_prepared", "--num-proc", "1")
    train_args = ["--job.config_file", RECIPE, "--training.dataset_path", str(out)]
    expected = tokenize_with_offsets(val_docs, ByteTokenizer())[0]
    for val_path in (val_file, tmp_path / "val_prepared"):
        cfg = load_config([*train_args, "--validation.dataset_path", str(val_path)])
        data = _load_data(cfg, ByteTokenizer())
        assert data.val_documents == 20
        np.testing.assert_array_equal(data.val_tokens[0 : len(expected) + 1], expected)
        assert len(data.train_doc_offsets) == len(docs) + 1  # nothing held out
    cfg = load_config([*train_args, "--validation.dataset_path", str(tmp_path / "nope")])
    with pytest.raises(ConfigError, match=r"^validation\.dataset_path = .*nope'"):
        _load_data(cfg, ByteTokenizer())
    broken = tmp_path / "val_broken"
    shutil.copytree(tmp_path / "val_prepared", broken)
    (broken / "manifest.json").unlink()
    cfg = load_config([*train_args, "--validation.dataset_path", str(broken)])
    with pytest.raises(ConfigError, match=r"^validation\.dataset_path = .*an incomplete"):
        _load_data(cfg, ByteTokenizer())


def test_train_from_prepared_and_resume_into_another_mesh(corpus, tmp_path):
    """2 ranks (FSDP) train 6 steps from a prepared corpus, validating on another prepared
    corpus, checkpointing every 3; 1 rank resumes at step 3 and its steps 4-6 (training and
    validation loss) match. A truncated shard then stops both ranks of a run, each with the one
    config-error line, before any collective."""
    out, docs = corpus
    val = _write_jsonl(tmp_path / "val.jsonl", docs[:40])
    _prepare(val, tmp_path / "val", "--num-proc", "1")
    data = [
        *("--training.dataset_path", str(out), "--validation.dataset_path", str(tmp_path / "val")),
        *("--validation.enable", "--validation.freq", "3", "--validation.seq_len", "64"),
        *("--validation.steps", "2", "--validation.local_batch_size", "2"),
    ]
    ckpt = ["--checkpoint.interval", "3", "--checkpoint.keep_latest_k", "3"]
    full = tmp_path / "full"
    args = [*tiny_run_args(full, 6, global_batch_size=4), *data, *ckpt]
    torchrun(2, args)
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint" / "step-3", resumed / "checkpoint" / "step-3")
    torchrun(1, [*tiny_run_args(resumed, 6, global_batch_size=4), *data, *ckpt])
    a = {r["step"]: r for r in read_metrics(full)}
    b = {r["step"]: r for r in read_metrics(resumed)}
    assert sorted(b) == [4, 5, 6]
    for step in b:
        assert abs(b[step]["loss"] - a[step]["loss"]) <= 5e-4 * abs(a[step]["loss"]), step
    val_a = {r["step"]: r["loss"] for r in read_metrics_of(full, "val")}
    val_b = {r["step"]: r["loss"] for r in read_metrics_of(resumed, "val")}
    assert sorted(val_a) == [3, 6] and sorted(val_b) == [6], (val_a, val_b)
    assert abs(val_b[6] - val_a[6]) <= 5e-4 * val_a[6]

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shard = broken / "shards" / "00000.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    bad = [*tiny_run_args(tmp_path / "bad", 2), "--training.dataset_path", str(broken)]
    proc = torchrun(2, bad, timeout=120, check=False)
    assert proc.returncode != 0
    line = f"config error: training.dataset_path = {str(broken)!r}: {shard}: "
    workers = proc.stderr.partition(" FAILED\n")[0]
    assert workers.count("config error") >= 1, proc.stderr[-3000:]
    for printed in re.findall(r"\[rank\d\] config error: .*", workers):
        assert printed.split("] ", 1)[1].startswith(line), printed
        assert "(truncated or altered)" in printed


def test_mixture_counts_match_weights_mesh_independent_and_resumable():
    """Two sources (tokens < 100, tokens >= 100) at 0.7 / 0.3: over a stage of 120 steps of 8
    units the tokens of each match the weights within 2%; dp 2 sees dp 1's batches; a loader
    resumed from the state continues exactly; ``train=1`` is the plain stream."""
    from torchtitan_ext.data.mixture import MixedWindows, parse_mixture

    rng = np.random.default_rng(0)
    a = rng.integers(0, 100, 40_000).astype(np.int32)
    b = rng.integers(100, 200, 9_000).astype(np.int32)
    mixture = parse_mixture("k", "train=7, other=3")
    assert [w for _, w, _ in mixture] == [0.7, 0.3]

    def loader(dp_rank: int, dp: int, accum: int) -> GlobalBatchLoader:
        sources = [PackedWindows(s, 32, 5, unit_len=64) for s in (a, b)]
        return GlobalBatchLoader(MixedWindows(sources, [0.7, 0.3], 5), 2, dp_rank, dp, accum)

    one = loader(0, 1, 4)
    steps = [np.concatenate([m[0].numpy() for m in one.next_step()]) for _ in range(120)]
    tokens = np.concatenate(steps)
    share = float((tokens < 100).mean())
    assert abs(share - 0.7) <= 0.02 * 0.7, share  # b (9k tokens) repeats several times
    two = [loader(r, 2, 2) for r in range(2)]
    for k in range(5):
        per_rank = [x.next_step() for x in two]
        batch = [per_rank[r][m][0].numpy() for m in range(2) for r in range(2)]
        np.testing.assert_array_equal(np.concatenate(batch), steps[k])
    resumed = loader(0, 1, 4)
    resumed.load_state_dict(two[0].state_dict())
    np.testing.assert_array_equal(
        np.concatenate([m[0].numpy() for m in resumed.next_step()]), steps[5]
    )
    plain = GlobalBatchLoader(PackedWindows(a, 32, 5, unit_len=64), 2, 0, 1, 4)
    mixed = GlobalBatchLoader(
        MixedWindows([PackedWindows(a, 32, 5, unit_len=64)], [1.0], 5), 2, 0, 1, 4
    )
    for _ in range(3):
        for (x, _), (y, _) in zip(plain.next_step(), mixed.next_step(), strict=True):
            assert bool((x == y).all())


MIXTURE_STAGES = """
[curriculum]
tokens_per_step = 256

[[curriculum.stages]]
seq_len = 32
steps = 2

[[curriculum.stages]]
seq_len = 64
steps = 2
mixture = "{mixture}"
"""


@pytest.mark.parametrize(
    ("mixture", "says"),
    [
        ("train=0.5, {out}=-1", "weight -1 must be > 0"),
        ("train=0.5, {out}=x", "weight 'x' is not a number"),
        ("train", "expected SRC=WEIGHT"),
        ("train=1, train=2", "train: named twice"),
        ("train=1@-5", "min_doc_tokens '-5' is not an int >= 0"),
    ],
)
def test_bad_mixture_weight_is_one_error_naming_the_stage_key(corpus, tmp_path, mixture, says):
    from tests.test_curriculum import plan

    out, _ = corpus
    stages = MIXTURE_STAGES.format(mixture=mixture.format(out=out))
    with pytest.raises(ConfigError, match=re.escape(says)) as err:
        plan(tmp_path, stages, world_size=1)
    assert err.value.key == "curriculum.stages[1].mixture"


def test_mixture_naming_no_source_fails_before_training(corpus, tmp_path):
    """The data phase (every rank, before any collective) opens every source."""
    from tests.test_curriculum import recipe
    from torchtitan_ext.distributed import RankInfo
    from torchtitan_ext.trainer.setup import prepare

    out, _ = corpus
    for mixture, says in [
        (f"train=1, {tmp_path / 'nope'}=1", "names no source"),
        (f"train=1, {out}=1@100000", "less than one unit of 65"),
    ]:
        stages = MIXTURE_STAGES.format(mixture=mixture)
        args = ["--job.config_file", str(recipe(tmp_path, stages)), "--validation.no-enable"]
        with pytest.raises(ConfigError, match=re.escape(says)) as err:
            prepare([*args, "--training.dataset_path", str(out)], RankInfo(0, 0, 1))
        assert err.value.key == "curriculum.stages[1].mixture", err.value


def test_curriculum_stage_trains_on_a_mixture(corpus, tmp_path):
    """1 rank, 2 stages: the second draws 50/50 from the training split and a prepared corpus
    of long documents; the plan table and the supply line name the mixture."""
    from tests.test_curriculum import recipe

    out, _ = corpus
    stages = MIXTURE_STAGES.format(mixture=f"train=1, {out}=1@1000")
    args = tiny_run_args(tmp_path / "run", 4)
    args[args.index("--job.config_file") + 1] = str(recipe(tmp_path, stages))
    args += ["--training.dataset_path", str(out)]
    proc = torchrun(1, args)
    assert "train 50%, out 50% (>= 1000)" in proc.stdout, proc.stdout[-3000:]
    supply = rf"stage 1 data mixture: train: 50%, [\d,]+ tokens, .*{out} .*repeats after"
    # Under the plan table at the start, and again when the stage starts.
    assert len(re.findall(supply, proc.stdout)) == 2, proc.stdout[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]


def test_a_folder_of_parts_is_one_corpus(corpus, tmp_path):
    """Prepared on a cluster: one ``prepare`` job per part of the source, each into its own
    folder under one parent (docs/data.md). The parent opens as one corpus, the parts in name
    order: the same tokens and document offsets as the corpus prepared in one job, and the
    same global batches; a part left incomplete is one error naming its file."""
    out, _ = corpus
    src = out.parent / "src"
    for k in range(3):
        _prepare(src / f"part{k}.jsonl", tmp_path / "parts" / f"part-{k:05d}")
    whole = open_prepared(str(out), BYTE)
    parts = open_prepared(str(tmp_path / "parts"), BYTE)
    assert parts.manifest["parts"] == ["part-00000", "part-00001", "part-00002"]
    assert parts.manifest["documents"] == 300 and len(parts.stream) == len(whole.stream)
    np.testing.assert_array_equal(parts.offsets, np.asarray(whole.offsets))
    np.testing.assert_array_equal(
        parts.stream[0 : len(parts.stream)], whole.stream[0 : len(whole.stream)]
    )
    for a, b in zip(
        GlobalBatchLoader(PackedWindows(whole.stream, 64, seed=3), 2, 0, 1, 2).next_step(),
        GlobalBatchLoader(PackedWindows(parts.stream, 64, seed=3), 2, 0, 1, 2).next_step(),
        strict=True,
    ):
        assert all(bool((x == y).all()) for x, y in zip(a, b, strict=True))
    (tmp_path / "parts" / "part-00001" / "manifest.json").unlink()
    with pytest.raises(ConfigError, match=r"part-00001/manifest.json: no such file") as err:
        open_prepared(str(tmp_path / "parts"), BYTE)
    assert err.value.key == "training.dataset_path"
