"""Data: corpus, tokenizers, packing, and the mesh independence of the global batch."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

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


def test_local_jsonl_and_text_datasets(tmp_path: Path):
    rows = [{"text": f"document number {i}", "id": i} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = SimpleNamespace(
        training=SimpleNamespace(dataset="mine", dataset_path=str(tmp_path / "a.jsonl")),
        data=SimpleNamespace(text_field="text"),
    )
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
