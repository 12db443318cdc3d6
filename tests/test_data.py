"""Data: corpus (local files and their errors), tokenizers, packing, and the mesh independence
of the global batch."""

import json
import os
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import ROOT, tiny_run_args, torchrun
from torchtitan_ext.config import ConfigError
from torchtitan_ext.data import (
    ByteTokenizer,
    GlobalBatchLoader,
    PackedWindows,
    load_documents,
    python_stdlib_documents,
    split_documents,
    tokenize,
)


@pytest.fixture(scope="module")
def stdlib_tokens() -> np.ndarray:
    train, _ = split_documents(python_stdlib_documents(), 0.02, seed=0)
    return tokenize(train, ByteTokenizer())


def test_stdlib_corpus_is_real_long_and_deterministic():
    docs = python_stdlib_documents()
    assert docs == python_stdlib_documents()
    assert len(docs) > 100
    assert sum(map(len, docs)) > 10_000_000  # tens of MB of real text
    assert max(map(len, docs)) > 1_000_000  # long documents for long-context stages
    assert any("def " in d and "# file: " in d for d in docs)


def test_split_is_seeded_and_disjoint():
    docs = [f"doc {i}" for i in range(100)]
    train, val = split_documents(docs, 0.1, seed=3)
    assert (train, val) == split_documents(docs, 0.1, seed=3)
    assert len(val) == 10 and not set(train) & set(val)
    assert split_documents(docs, 0.1, seed=4) != (train, val)


def test_byte_tokenizer_round_trip_and_packing():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo'\n"
    ids = tok.encode(text)
    assert ids[0] == ByteTokenizer.BOS_ID and ids[-1] == ByteTokenizer.EOS_ID
    assert tok.decode(ids) == text
    stream = tokenize(["ab", "c"], tok)
    assert stream.tolist() == [256, 97, 98, 257, 256, 99, 257]
    windows = PackedWindows(stream, seq_len=2, seed=0, shuffle=False)
    inputs, labels = windows.batch(0, 2)
    assert inputs.tolist() == [[256, 97], [257, 256]]
    assert labels.tolist() == [[97, 98], [256, 99]]
    assert inputs.dtype == torch.int64


def _step_windows(loader_factory, dp: int, steps: int) -> list[list[tuple[int, ...]]]:
    """The sorted set of (input row) windows each step, over all dp ranks and microbatches."""
    loaders = [loader_factory(r) for r in range(dp)]
    out = []
    for _ in range(steps):
        rows = []
        for loader in loaders:
            for inputs, _ in loader.next_step():
                rows += [tuple(r) for r in inputs.tolist()]
        out.append(sorted(rows))
    return out


@pytest.mark.parametrize("adds_bos", [False, True], ids=["plain", "post_processor_bos"])
def test_batched_hf_encoding_equals_encoding_one_by_one(tmp_path, monkeypatch, adds_bos):
    """``encode_documents`` (batched ``encode_batch_fast``, several batches here) gives each
    document exactly ``encode_document``'s ids, with BOS/EOS added as TorchTitan's wrapper adds
    them: also for a tokenizer whose own post-processor puts BOS in front."""
    from tokenizers import Tokenizer, processors
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from tests.test_features import _write_hf_tokenizer
    from torchtitan_ext.data import tokenizer as tokenizer_module

    _write_hf_tokenizer(tmp_path)
    if adds_bos:
        hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
        bos = "<|begin_of_text|>"
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, hf.token_to_id(bos))]
        )
        hf.save(str(tmp_path / "tokenizer.json"))
    tok = HuggingFaceTokenizer(str(tmp_path))
    assert tok.hf_adds_bos == adds_bos
    docs = [*python_stdlib_documents()[:40], "", "naïve → ∑ 😀\n", " lead and trail "]
    monkeypatch.setattr(tokenizer_module, "BATCH_CHARS", 200_000)  # several batches
    assert len(list(tokenizer_module._char_batches(docs, 200_000))) > 3
    got = tokenizer_module.encode_documents(tok, docs)
    want = [tokenizer_module.encode_document(tok, d) for d in docs]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.int32 and np.array_equal(g, w)
        assert g[0] == tok.bos_id and g[-1] == tok.eos_id and (g == tok.bos_id).sum() == 1


def test_global_batch_does_not_depend_on_mesh(stdlib_tokens):
    windows = PackedWindows(stdlib_tokens, seq_len=32, seed=0)
    global_batch = 16
    layouts = [(1, 16, 1), (4, 4, 1), (4, 1, 4), (2, 2, 4), (8, 2, 1)]  # (dp, B, accum)
    results = []
    for dp, b, accum in layouts:
        assert dp * b * accum == global_batch

        def factory(r, dp=dp, b=b, accum=accum):
            return GlobalBatchLoader(windows, b, dp_rank=r, dp_degree=dp, grad_accum_steps=accum)

        results.append(_step_windows(factory, dp, steps=3))
    for other in results[1:]:
        assert other == results[0]
    # And different steps see different data.
    assert results[0][0] != results[0][1]


def test_loader_state_resumes_exact_next_batch(stdlib_tokens):
    windows = PackedWindows(stdlib_tokens, seq_len=32, seed=0)
    a = GlobalBatchLoader(windows, 2, dp_rank=1, dp_degree=2, grad_accum_steps=2)
    for _ in range(3):
        a.next_step()
    state = a.state_dict()
    expected = a.next_step()
    # A loader for another mesh (dp 1) resumes at the same global position.
    b = GlobalBatchLoader(PackedWindows(stdlib_tokens, 32, 0), 8, 0, 1, 1)
    b.load_state_dict(state)
    got = torch.cat([x for x, _ in b.next_step()])
    # Exact check: rank 1 of dp 2, microbatch m holds indices base + m * 4 + 2 + [0, 2).
    assert torch.equal(expected[0][0], got[2:4])
    assert torch.equal(expected[1][0], got[6:8])
    with pytest.raises(ConfigError, match="seq_len"):
        GlobalBatchLoader(PackedWindows(stdlib_tokens, 64, 0), 2, 0, 1, 1).load_state_dict(state)


def test_epochs_wrap_with_a_new_window_order():
    stream = np.arange(100, dtype=np.int32)
    windows = PackedWindows(stream, seq_len=9, seed=0)  # 10 windows per epoch
    first = {int(windows.window(i)[0]) for i in range(10)}
    assert first == {10 * i for i in range(10)}
    order0 = [int(windows.window(i)[0]) for i in range(10)]
    order1 = [int(windows.window(10 + i)[0]) for i in range(10)]
    assert sorted(order0) == sorted(order1) and order0 != order1


def test_stage_switch_continues_the_token_stream():
    """Curriculum stages share one grid of units (the longest seq_len + 1 tokens): after a
    switch the next stage continues after the units the last one touched, so nothing is seen
    twice before the epoch ends and at most one global batch of units is skipped per switch;
    each step's windows come from distinct units even when a unit holds several windows."""
    stream = np.arange(17 * 40 + 5, dtype=np.int32)  # 40 units of 16 + 1 tokens, and a tail
    seen: list[set[int]] = []
    state = None
    units_used = 0
    for seq_len, steps in ((4, 5), (8, 3), (16, 40)):  # 3 windows per step; the last: to the end
        windows = PackedWindows(stream, seq_len, seed=3, unit_len=16)
        assert windows.num_windows == 40 * 16 // seq_len
        loader = GlobalBatchLoader(windows, 3, 0, 1, 1, continue_at_new_seq_len=True)
        if state is not None:
            loader.load_state_dict(state)
        tokens: set[int] = set()
        for _ in range(steps):
            if loader.origin_units + loader.windows_consumed // windows.per_unit + 3 > 40:
                break  # the epoch's end
            ((inputs, _),) = loader.next_step()
            units = {int(row[0]) // 17 for row in inputs}
            assert len(units) == 3, inputs  # three places of the stream per step
            tokens |= set(inputs.flatten().tolist())
        seen.append(tokens)
        state = loader.state_dict()
        units_used = loader.origin_units + loader.windows_consumed // windows.per_unit
    assert not seen[0] & seen[1] and not (seen[0] | seen[1]) & seen[2]
    unused = set(range(40 * 17)) - (seen[0] | seen[1] | seen[2])
    # Left: the one token per unit that is only ever a label, the rest of the partly used
    # group of 3 units at each of the 2 switches, and the units after the last full step.
    assert len(unused) <= 40 + 2 * 3 * 17 + (40 - units_used) * 17, len(unused)


def _cfg(path: Path, text_field: str = "text") -> SimpleNamespace:
    return SimpleNamespace(
        training=SimpleNamespace(dataset="mine", dataset_path=str(path)),
        data=SimpleNamespace(text_field=text_field),
    )


def _load_error(path: Path, text_field: str = "text") -> ConfigError:
    """The ConfigError of loading ``path``, checked to be one line."""
    with pytest.raises(ConfigError) as info:
        load_documents(_cfg(path, text_field))
    assert "\n" not in str(info.value)
    return info.value


def _parquet(path: Path, column: dict[str, list], row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(column), path, row_group_size=row_group_size)
    return path


def test_local_jsonl_and_text_datasets(tmp_path: Path):
    rows = [{"text": f"document number {i}", "id": i} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _cfg(tmp_path / "a.jsonl")
    assert load_documents(cfg) == [r["text"] for r in rows]
    cfg.data.text_field = "body"
    with pytest.raises(ConfigError, match=r"data\.text_field"):
        load_documents(cfg)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "x.txt").write_text("line one\nline two\n")
    (texts / "y.txt").write_text("other file")
    cfg.training.dataset_path = str(texts)
    assert load_documents(cfg) == ["line one\nline two\n", "other file"]


def test_valid_local_files_and_folders_give_exactly_their_documents(tmp_path: Path):
    docs = [
        "plain",
        "héllo wörld ✓ 🎉",
        '  quotes " and \\ backslash ',
        "two\nlines\n",
        "x" * 70_000,
    ]
    jl = tmp_path / "jl"
    (jl / "sub").mkdir(parents=True)
    # Blank lines are skipped; other columns (of any type) are ignored.
    (jl / "b.jsonl").write_text(
        "\n".join(json.dumps({"id": i, "text": d, "meta": {"k": [i]}}) for i, d in enumerate(docs))
        + "\n\n"
    )
    (jl / "a.json").write_text(json.dumps([{"text": d, "n": 1.5} for d in docs[:2]]))
    (jl / "sub" / "c.jsonl").write_text(json.dumps({"text": "last"}) + "\n")
    assert load_documents(_cfg(jl / "b.jsonl")) == docs
    assert load_documents(_cfg(jl / "a.json")) == docs[:2]
    # A folder: files in sorted path order (a.json, b.jsonl, sub/c.jsonl), rows in file order.
    assert load_documents(_cfg(jl)) == [*docs[:2], *docs, "last"]
    pqs = tmp_path / "pq"
    pqs.mkdir()
    _parquet(pqs / "1.parquet", {"text": docs, "k": list(range(5))}, row_group_size=2)
    _parquet(pqs / "0.parquet", {"body": ["b0", "b1"], "text": ["p0", "p1"]})
    assert load_documents(_cfg(pqs / "1.parquet")) == docs
    assert load_documents(_cfg(pqs)) == ["p0", "p1", *docs]
    txt = tmp_path / "txt"
    (txt / "z").mkdir(parents=True)
    for i, d in enumerate(docs):
        (txt / f"{i}.txt").write_text(d, encoding="utf-8")
    (txt / "z" / "crlf.txt").write_bytes(b"a\r\nb\r\n")  # datasets reads text with newline=None
    assert load_documents(_cfg(txt / "1.txt")) == [docs[1]]
    assert load_documents(_cfg(txt)) == [*docs, "a\nb\n"]


def _write(path: Path, data: bytes | str) -> Path:
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


BAD_FILES = [
    # (file name, content, ConfigError key, what the reason says besides the file's path)
    ("empty.jsonl", b"", "training.dataset_path", ["empty file", "no documents"]),
    ("blank.jsonl", "\n  \n\n", "training.dataset_path", ["no documents"]),
    ("empty.txt", b"", "training.dataset_path", ["empty file"]),
    ("malformed.jsonl", '{"text": "a"}\n\n{"text": "b"\n', "training.dataset_path",
     ["line 3", "invalid JSON"]),
    ("list.jsonl", '{"text": "a"}\n[1, 2]\n', "training.dataset_path",
     ["line 2", "expected a JSON object"]),
    ("binary.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', "training.dataset_path",
     ["byte offset 24 (line 2)", "not UTF-8"]),
    ("binary.txt", b"hello\nwor\xffld\x00\x01", "training.dataset_path",
     ["byte 0xff at byte offset 9 (line 2)", "not UTF-8"]),
    ("missing.jsonl", '{"text": "a"}\n\n{"body": "b"}\n', "data.text_field",
     ["line 3", "no 'text' field"]),
    ("null.jsonl", '{"text": "a"}\n{"text": null}\n', "data.text_field", ["line 2", "is null"]),
    ("number.jsonl", '{"text": 4}\n{"text": "b"}\n', "data.text_field",
     ["line 1", "int 4, not a string"]),
    ("objects.jsonl", "{}\n{}\n", "data.text_field", ["line 1", "no 'text' field"]),
    ("nocolumn.jsonl", '{"body": "a"}\n{"body": "b"}\n', "data.text_field",
     ["no such column", "['body']"]),
    ("null.json", '[{"text": "a"}, {"text": "b"}, {"text": null}]', "data.text_field",
     ["row index 2", "is null"]),
    ("missing.json", '[{"text": "a"}, {"id": 1, "txt": "b"}]', "data.text_field",
     ["row index 1", "no 'text' field"]),
    ("malformed.json", '[{"text": "a"},\n {"text": }]', "training.dataset_path",
     ["line 2 column 11", "invalid JSON"]),
    ("empty.json", "[]", "training.dataset_path", ["no documents"]),
    ("corrupt.parquet", b"PAR1 not really a parquet file", "training.dataset_path",
     ["not a readable parquet file"]),
    # Valid for json.loads, not for pyarrow: the file and the first line of datasets' error.
    ("duplicate.jsonl", '{"text": "a"}\n{"text": "a", "text": "b"}\n', "training.dataset_path",
     ["datasets' json loader failed: ArrowInvalid: JSON parse error:", "specified twice"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "key", "says"), BAD_FILES, ids=[b[0] for b in BAD_FILES]
)
def test_bad_local_file_is_one_config_error_naming_the_file(tmp_path, name, content, key, says):
    path = _write(tmp_path / name, content)
    err = _load_error(path)
    assert err.key == key
    assert err.value == (str(path) if key == "training.dataset_path" else "text")
    assert str(path) in err.reason
    for part in says:
        assert part in err.reason


def test_bad_parquet_files_name_the_file_and_row(tmp_path: Path):
    zero = _parquet(tmp_path / "zero.parquet", {"text": pa.array([], pa.string())})
    err = _load_error(zero)
    assert (err.key, err.value) == ("training.dataset_path", str(zero))
    assert f"{zero}: no documents" in err.reason
    nulls = _parquet(tmp_path / "nulls.parquet", {"text": ["a", "b", "c", None]}, 2)
    err = _load_error(nulls)
    assert (err.key, err.value) == ("data.text_field", "text")
    assert f"{nulls}: row index 3: 'text' is null" in err.reason
    ints = _parquet(tmp_path / "ints.parquet", {"text": [1, 2]})
    assert f"{ints}: row index 0: 'text' is int 1, not a string" in _load_error(ints).reason
    err = _load_error(ints, text_field="body")
    assert (err.key, err.value) == ("data.text_field", "body")
    assert f"no such column in {ints}; its columns are ['text']" in err.reason
    good = _parquet(tmp_path / "good.parquet", {"text": [f"doc {i}" for i in range(100)]}, 10)
    truncated = _write(tmp_path / "truncated.parquet", good.read_bytes()[:-200])
    err = _load_error(truncated)
    assert err.key == "training.dataset_path"
    assert f"{truncated}: not a readable parquet file" in err.reason


def test_bad_file_in_a_folder_is_named(tmp_path: Path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "fine"}\n')
    bad = _write(folder / "b.jsonl", '{"text": "fine"}\n{"text": "oops}\n')
    err = _load_error(folder)
    assert (err.key, err.value) == ("training.dataset_path", str(folder))
    assert f"{bad}: line 2: invalid JSON" in err.reason
    # Relative dataset paths are reported as absolute file paths.
    relative = Path(os.path.relpath(folder))
    assert f"{bad}: line 2" in _load_error(relative).reason
    # .txt folders load in one call first; a failure still names its file.
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(3):
        (texts / f"{i}.txt").write_text(f"document {i}")
    binary = _write(texts / "1.txt", b"ok\xc3")
    assert (
        f"{binary}: not UTF-8 text: byte 0xc3 at byte offset 2 (line 1)"
        in _load_error(texts).reason
    )
    empty = _write(texts / "1.txt", b"")
    assert f"{empty}: empty file" in _load_error(texts).reason


def test_unopenable_file_is_a_config_error(tmp_path: Path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "fine"}\n')
    (folder / "b.jsonl").symlink_to(tmp_path / "gone.jsonl")  # dangling link
    err = _load_error(folder)
    assert err.key == "training.dataset_path"
    assert f"{folder / 'b.jsonl'}: cannot be opened: No such file or directory" in err.reason
    assert "no such file or folder" in _load_error(tmp_path / "nope.jsonl").reason


def _load_as(path: Path, uid: int, warm_up: Path) -> str:
    """What loading ``path`` gives in a forked child running as ``uid`` (root reads files
    whatever their permissions, and CI runs as root): the documents, or the ConfigError's key
    and reason. The child first loads ``warm_up`` as root, so every module the loader needs is
    imported before it loses access to the interpreter's own files."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, load, report, exit without finalization
        os.close(read_end)
        try:
            load_documents(_cfg(warm_up))
            os.setgid(uid)
            os.setuid(uid)
            reason = f"documents {load_documents(_cfg(path))}"
        except ConfigError as e:
            reason = f"{e.key}|{e.reason}"
        except BaseException as e:  # reported to the parent, which fails the test with it
            reason = f"unexpected {type(e).__name__}: {e}"
        os.write(write_end, reason.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        reason = f.read().decode()
    os.waitpid(pid, 0)
    return reason


def test_unreadable_file_is_a_config_error():
    """A file without read permission, read by an unprivileged user (the check runs in a child
    that drops root, so it runs in CI too)."""
    nobody = 65534
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o711)  # the unprivileged child may traverse it, not list it
        warm_up = _write(Path(tmp) / "warm_up.jsonl", '{"text": "w"}\n')
        path = _write(Path(tmp) / "secret.jsonl", '{"text": "a"}\n')
        path.chmod(0)
        assert _load_as(path, nobody, warm_up) == (
            f"training.dataset_path|{path}: cannot be opened: Permission denied"
        )
        path.chmod(0o644)  # the control: the same child reads it once it may
        assert _load_as(path, nobody, warm_up) == "documents ['a']"


def test_rewritten_file_is_read_again_and_datasets_left_quiet(tmp_path: Path, capfd):
    """A corrected file is re-read even with the same mtime (datasets' non-streaming cache is
    keyed by path and mtime), nothing is printed, and datasets' settings are restored."""
    import datasets
    from datasets.utils import logging as datasets_logging

    before = (
        datasets.is_progress_bar_enabled(),
        datasets_logging.get_verbosity(),
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS,
    )
    path = _write(tmp_path / "d.jsonl", '{"text": "first"}\n{"text": "a"\n')
    stat = path.stat()
    assert "line 2: invalid JSON" in _load_error(path).reason
    for text in ("fixed", "again"):
        path.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "b"}) + "\n")
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert load_documents(_cfg(path)) == [text, "b"]
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "x.txt").write_bytes(b"\xff")
    _load_error(folder)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    after = (
        datasets.is_progress_bar_enabled(),
        datasets_logging.get_verbosity(),
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS,
    )
    assert after == before


def test_empty_dataset_fails_fast_with_one_line_on_every_rank(tmp_path: Path):
    """A real 2-rank torchrun: each rank reports the empty file as its one config-error line and
    exits 2 before any collective; no worker prints a traceback."""
    empty = _write(tmp_path / "empty.jsonl", b"")
    args = [*tiny_run_args(tmp_path / "dump", steps=2), "--training.dataset_path", str(empty)]
    # A hang waiting for a collective would run into the subprocess timeout.
    proc = torchrun(2, args, timeout=120, check=False)
    assert proc.returncode != 0  # torchrun itself exits 1 whatever its workers' codes
    line = (
        f"config error: training.dataset_path = {str(empty)!r}: {empty}: empty file (0 bytes), "
        "no documents\n"
    )
    # torchrun stops the other rank (SIGTERM) as soon as one exits, so a rank exited 2 after
    # its line, or was stopped before or after printing it (its summary lists every rank).
    codes = dict(
        re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s*exitcode\s*: (-?\d+)", proc.stderr)
    )
    assert sorted(codes) == ["0", "1"] and "2" in codes.values(), proc.stderr[-3000:]
    # The workers' own lines come before torchrun's failure summary, which repeats a line
    # (from the worker's error file) for each rank that wrote one.
    workers, _, summary = proc.stderr.partition(" FAILED\n")
    for rank, code in codes.items():
        assert code in ("2", "-15"), proc.stderr[-3000:]
        printed = workers.count(f"[rank{rank}] {line}")
        assert printed == 1 if code == "2" else printed <= 1, proc.stderr[-3000:]
    assert workers.count("config error") == workers.count(line)
    assert "config error: training.dataset_path" in summary, summary
    output = proc.stdout + proc.stderr
    # The launcher's own ChildFailedError summary is the only traceback.
    assert output.count("Traceback (most recent call last)") <= 1
    for ours in (ROOT / "train.py", ROOT / "torchtitan_ext"):
        assert f'File "{ours}' not in output  # no frame of our code anywhere
    assert "site-packages/datasets/" not in output and "StopIteration" not in output
    assert "Generating train split" not in output  # datasets' progress bars are off


def test_unavailable_dataset_is_a_config_error():
    cfg = SimpleNamespace(
        training=SimpleNamespace(dataset="c4", dataset_path=None),
        data=SimpleNamespace(text_field="text"),
    )
    with pytest.raises(ConfigError, match=r"training\.dataset = 'c4': not available offline"):
        load_documents(cfg)


def test_long_documents_keeps_whole_long_documents():
    from torchtitan_ext.data import ByteTokenizer, long_documents, tokenize_with_offsets

    docs = ["ab", "abcdefgh", "abcd", "abcdefghij"]
    tokens, offsets = tokenize_with_offsets(docs, ByteTokenizer())
    assert offsets.tolist() == [0, 4, 14, 20, 32]  # BOS + bytes + EOS per document
    kept = long_documents(tokens, offsets, min_tokens=10)
    assert kept.tolist() == tokens[4:14].tolist() + tokens[20:32].tolist()
    assert len(long_documents(tokens, offsets, min_tokens=100)) == 0
