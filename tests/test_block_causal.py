"""Block-causal (document-masked) attention under every context-parallel pattern and load
balancer, against single-device masked SDPA in fp32: forward output and q/k/v gradients.

One launch of 8 gloo ranks covers cp 2, 4 and 8 (the mesh is dp x cp, 8 / cp replicas), every
pattern of each, and at each cp degree every document layout: documents crossing shard
boundaries (random), one document spanning all ranks (a window with no EOS), many one-token
documents, a document ending exactly on a shard boundary; every load balancer; fp32 and bf16;
GQA; batch 2 with different documents per row. Each pattern runs two (layout, balancer) cases
(three at cp 2), rotating so that each cp degree sees every layout and every balancer.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import spawn

EOS = 1
PATTERNS = {
    2: [("ring", 0), ("ulysses", 0)],
    4: [("ring", 0), ("ulysses", 0), ("hybrid", 2), ("double_ring", 2)],
    8: [
        ("ring", 0),
        ("ulysses", 0),
        ("hybrid", 2),
        ("hybrid", 4),
        ("double_ring", 2),
        ("double_ring", 4),
    ],
}
BALANCERS = (None, "headtail", "per_document_headtail", "ptrr", "per_document_lpt")
DOCS = ("random", "no_eos", "one_token", "shard_boundary")


def _tokens(kind: str, b: int, s: int, cp: int, gen: torch.Generator) -> torch.Tensor:
    tokens = torch.randint(2, 50, (b, s), generator=gen)
    if kind == "random":
        tokens[torch.rand(b, s, generator=gen) < 0.08] = EOS
    elif kind.startswith("mean"):  # documents of geometric lengths of that mean
        tokens[torch.rand(b, s, generator=gen) < 1 / int(kind[4:])] = EOS
    elif kind == "one_token":
        tokens[:, : s // 2] = EOS  # half the window: one-token documents
        tokens[1, s // 2 :: 3] = EOS
    elif kind == "shard_boundary":
        tokens[:, s // cp - 1] = EOS  # a document ends on the first shard's last token
        tokens[:, s // 2 - 1] = EOS
        tokens[1, 5] = EOS
    return tokens


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, grad: torch.Tensor
) -> list[torch.Tensor]:
    s = q.shape[2]
    pos = torch.arange(s)
    visible = (pos[None, None, :] <= pos[None, :, None]) & (
        pos[None, None, :] >= starts[:, :, None]
    )
    rq, rk, rv = (t.float().clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(rq, rk, rv, attn_mask=visible[:, None], enable_gqa=True)
    out.backward(grad.float())
    grads = [t.grad for t in (rq, rk, rv)]
    assert all(g is not None for g in grads)
    return [out.detach(), *(g for g in grads if g is not None)]


def _take(x: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, H, n, D): the positions ``mine`` (B, n) of each batch row."""
    return torch.stack([x[b][:, mine[b]] for b in range(x.shape[0])])


def _rel(got: torch.Tensor, want: torch.Tensor, whole: torch.Tensor) -> float:
    """Error of a shard relative to the norm of the whole tensor (a shard of one-token
    documents has a gradient of q and k that is 0 up to rounding)."""
    return float((got.float() - want.float()).norm() / whole.float().norm())


def _check(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from torchtitan_ext.parallel import cp_block_causal, cp_patterns
    from torchtitan_ext.parallel.cp_documents import document_starts, layout

    failures = []
    seen: set[tuple[int, str, str | None]] = set()
    case = 0
    for cp in (2, 4, 8):
        mesh = init_device_mesh("cpu", (world_size // cp, cp), mesh_dim_names=("dp", "cp"))
        cp_mesh = mesh["cp"]
        c = cp_mesh.get_local_rank()
        for name, inner in PATTERNS[cp]:
            pattern = cp_patterns.make_pattern(name, cp, inner, inner)
            cp_patterns.register(cp_mesh, pattern)
            plan = cp_block_causal.make_plan(cp_mesh, pattern)
            # Two document layouts per pattern (three at cp 2, which has two patterns), and as
            # many balancers, rotating so that each cp degree sees every layout and every
            # balancer (4 layouts and 5 balancers: coprime, so all 20 pairs over all cases).
            for _ in range(3 if len(PATTERNS[cp]) < 3 else 2):
                docs = DOCS[case % len(DOCS)]
                balancer = BALANCERS[case % len(BALANCERS)]
                seen.add((cp, docs, balancer))
                case += 1
                dtype = torch.bfloat16 if case % 3 == 0 else torch.float32
                gen = torch.Generator().manual_seed(case)
                b, h, hk, d = 2, 8, 2, 8
                s = 16 * cp
                tokens = _tokens(docs, b, s, cp, gen)
                q, k, v = (torch.randn(b, n, s, d, generator=gen).to(dtype) for n in (h, hk, hk))
                grad = torch.randn(b, h, s, d, generator=gen).to(dtype)
                starts = document_starts(tokens, EOS)
                ref = _reference(q, k, v, starts, grad)
                perm = layout(starts, cp, balancer)
                n = s // cp
                mine = perm[:, c * n : (c + 1) * n]
                mask = cp_block_causal.DocumentMask.of(starts, perm, cp)
                lq, lk, lv = (_take(t, mine).detach().clone().requires_grad_() for t in (q, k, v))
                out = cp_block_causal.block_causal_attention(lq, lk, lv, mask, plan)
                out.backward(_take(grad, mine))
                got = [out.detach(), *(t.grad for t in (lq, lk, lv) if t.grad is not None)]
                assert len(got) == 4
                want = [_take(t, mine) for t in ref]
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                errs = [_rel(g, w, r) for g, w, r in zip(got, want, ref, strict=True)]
                if max(errs) > tol:
                    failures.append(f"cp{cp} {name}{inner or ''} {docs} {balancer} {dtype}: {errs}")
    assert not failures, "\n".join(failures[:20])
    for cp in (2, 4, 8):
        assert {b for c, _, b in seen if c == cp} == set(BALANCERS), (cp, seen)
        assert {d for c, d, _ in seen if c == cp} == set(DOCS), (cp, seen)


def test_block_causal_every_pattern_and_balancer_against_masked_sdpa() -> None:
    spawn(_check, 8)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_document_balancers_even_the_masked_work(cp: int) -> None:
    """Every balancer deals each cp rank S / cp distinct positions, ascending; the per-document
    LPT balancer keeps the busiest rank's masked work within 1.05 of the idlest's (its aim:
    1.02) on every document layout, where torch's head-tail leaves one rank up to 15x another;
    and on documents of mean S/8 to S/128 it needs at most 0.6x the kernel calls of torch's
    per-document head-tail (short documents stay whole instead of being cut into 2 cp
    chunks), the calls that set its time at short documents (docs/context_parallel.md)."""
    from torchtitan_ext.parallel import block_causal
    from torchtitan_ext.parallel.cp_documents import DocumentMask, document_starts, layout
    from torchtitan_ext.parallel.cp_documents import work_per_rank as work

    s = 4096
    spreads: dict[tuple[str, str], float] = {}
    for kind in ("mean512", "mean128", "mean32", "no_eos", "one_token", "shard_boundary"):
        starts = document_starts(_tokens(kind, 2, s, cp, torch.Generator().manual_seed(cp)), EOS)
        calls = {}
        for lb in ("headtail", "per_document_headtail", "ptrr", "per_document_lpt"):
            perm = layout(starts, cp, lb)
            assert torch.equal(perm.sort(dim=1).values, torch.arange(s).expand(2, s)), (kind, lb)
            mask = DocumentMask.of(starts, perm, cp)
            assert bool((mask.positions.diff(dim=2) > 0).all()), (kind, lb)
            w = work(mask).double()
            assert int(w.sum()) == int((torch.arange(s) - starts + 1).sum())
            spreads[kind, lb] = float(w.max() / w.min())
            calls[lb] = sum(
                len(
                    block_causal.tiles(
                        mask.positions[:, c], mask.starts[:, c], mask.positions[:, j]
                    )
                )
                for c in range(cp)
                for j in range(cp)
            )
        assert spreads[kind, "per_document_lpt"] <= 1.05, (kind, spreads)
        if kind.startswith("mean"):
            assert calls["per_document_lpt"] <= 0.6 * calls["per_document_headtail"], (kind, calls)
    assert max(v for (_, lb), v in spreads.items() if lb == "headtail") > 1.3 * cp, spreads


def test_document_starts_follow_torchtitans_document_mask() -> None:
    """``document_starts`` gives the mask of TorchTitan 0.2.2's ``get_document_mask_mod``
    (the EOS closes its document) on every layout the numerics test uses."""
    from torchtitan.models.attention import get_document_mask_mod

    from torchtitan_ext.parallel.cp_documents import document_starts

    gen = torch.Generator().manual_seed(0)
    for kind in DOCS:
        tokens = _tokens(kind, 2, 64, 4, gen)
        starts = document_starts(tokens, EOS)
        mod = get_document_mask_mod(tokens.clone(), EOS)
        idx = torch.arange(64)
        for b in range(2):
            theirs = mod(torch.tensor(b), torch.tensor(0), idx[:, None], idx[None, :])
            same_doc = starts[b][:, None] == starts[b][None, :]
            assert torch.equal(theirs, same_doc), kind


def _tiny_model() -> torch.nn.Module:
    from torchtitan.protocols.train_spec import get_train_spec

    import torchtitan_ext.models  # noqa: F401  (registers our flavors)
    from torchtitan_ext.parallel.cp_block_causal import apply_block_causal
    from torchtitan_ext.parallel.cp_groups import CPPattern

    spec = get_train_spec("llama3")
    torch.manual_seed(0)
    model = spec.model_cls(spec.model_args["debugmodel_cpu_deep_gqa"])
    with torch.no_grad():
        model.init_weights()
    apply_block_causal(model, None, CPPattern("ring", 1))
    return model


def test_packed_window_loss_is_the_sum_of_its_documents() -> None:
    """The mask is applied: a packed window of three documents, run with its DocumentMask,
    gives each token the loss it has when its document runs alone (RoPE positions from 0 at
    each document, and also with the window's positions: attention sees relative positions
    only); run causal, the later documents' losses differ."""
    from torchtitan_ext.parallel.cp_documents import shard_documents

    model = _tiny_model()
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(2, 200, (n,), generator=gen) for n in (20, 7, 37)]
    for doc in docs:
        doc[-1] = EOS
    window = torch.cat(docs)[None]
    labels = torch.roll(window, -1, dims=1)

    def token_losses(inputs: torch.Tensor, targets: torch.Tensor, **kw: object) -> torch.Tensor:
        logits = model(inputs, **kw)
        return F.cross_entropy(logits[0].float(), targets[0], reduction="none")

    with torch.no_grad():
        alone = torch.cat(
            [
                token_losses(d[None], labels[:, o : o + len(d)])
                for d, o in zip(docs, (0, 20, 27), strict=True)
            ]
        )
        for restart in (True, False):
            inputs, targets, positions, mask = shard_documents(
                window, labels, EOS, 1, 0, None, restart_positions=restart
            )
            packed = token_losses(inputs, targets, positions=positions, attention_masks=mask)
            torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
        causal = token_losses(window, labels)
    assert torch.allclose(causal[:20], alone[:20], rtol=1e-5, atol=1e-5)
    assert (causal[20:] - alone[20:]).abs().max() > 1e-2


def test_masked_fraction_from_document_lengths() -> None:
    """The share of causal pairs the mask keeps: 2 / (S + 1) for one-token documents, 1 for a
    document longer than every window."""
    import numpy as np

    from torchtitan_ext.parallel.cp_documents import masked_fraction

    assert masked_fraction(np.arange(0, 5001), 128) == pytest.approx(2 / 129)
    assert masked_fraction(np.array([0, 5000]), 128) == 1.0


def test_planner_and_dry_run_count_the_masked_attention_work(tmp_path, capsys) -> None:
    """With block_causal on a prepared corpus of short documents, the planner's compute
    estimate drops by the attention work the mask removes (measured from the corpus's
    document index), and the dry run says how much, and that the ring's bytes stay; data that
    is not prepared is measured on a sample of its documents."""
    import json
    import sys
    from pathlib import Path

    from torchtitan_ext.config.manager import load_config
    from torchtitan_ext.data.prepare import main as prepare_main
    from torchtitan_ext.tools import auto_mesh

    root = Path(__file__).resolve().parent.parent
    recipe = str(root / "train_configs" / "debug_cpu.toml")
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": "x" * (10 + i % 50)}) + "\n" for i in range(3000)))
    assert prepare_main(["--source", str(src), "--out", str(tmp_path / "c"),
                         "--job.config_file", recipe]) == 0  # fmt: skip
    base = ["--job.config_file", recipe, "--training.dataset_path", str(tmp_path / "c"),
            "--parallelism.data_parallel_shard_degree", "2",
            "--training.global_batch_size", "8"]  # fmt: skip
    est = {}
    for mask in ("causal", "block_causal"):
        cfg = load_config([*base, "--model.attn_mask_type", mask])
        est[mask] = auto_mesh.estimate_mesh(cfg, 2, 1e9)
    fraction = auto_mesh.masked_attention_fraction(cfg, _resolved(cfg))
    assert 0 < fraction < 0.2  # documents of 10-60 bytes in windows of 256
    assert est["block_causal"].compute_sec < est["causal"].compute_sec
    assert est["block_causal"].comm_gib == est["causal"].comm_gib  # the ring's bytes stay
    sys.path.insert(0, str(root / "scripts"))
    from plan import main as plan_main

    assert plan_main([*base, "--model.attn_mask_type", "block_causal", "--world_size", "2"]) == 0
    out = capsys.readouterr().out
    assert f"block_causal: attention work {fraction:.3f} of causal" in out, out
    assert "per_document_headtail: documents of" not in out  # the recipe's balancer: head-tail
    # Documents of about 35 tokens at cp 2: chunks of about 9 tokens, per-document LPT is
    # suggested.
    pdht = ["--parallelism.context_parallel_load_balancer", "per_document_headtail"]
    cp2 = ["--parallelism.context_parallel_degree", "2", "--parallelism.data_parallel_shard_degree",
           "1", "--model.attn_mask_type", "block_causal", "--world_size", "2"]  # fmt: skip
    assert plan_main([*base, *cp2, *pdht]) == 0
    out = capsys.readouterr().out
    assert "context_parallel_load_balancer = 'per_document_lpt' (short documents" in out, out
    assert plan_main([*base, *cp2]) == 0  # the recipe's head-tail, blind to documents
    out = capsys.readouterr().out
    assert "headtail: balances a causal mask, not documents" in out, out
    lpt = ["--parallelism.context_parallel_load_balancer", "per_document_lpt"]
    assert plan_main([*base, *cp2, *lpt]) == 0
    out = capsys.readouterr().out
    assert "per_document_lpt" not in out, out
    # The same documents as a local file, not prepared: measured on a sample of them (all
    # 3,000 here, in another order), and the dry run names the source.
    local = load_config([*base[:2], "--training.dataset_path", str(src),
                         "--model.attn_mask_type", "block_causal"])  # fmt: skip
    assert auto_mesh.masked_attention_fraction(local, _resolved(local)) == pytest.approx(
        fraction, abs=0.01
    )
    # The embedded corpus (the recipe's default data): long source files, little masked.
    embedded = load_config(["--job.config_file", recipe, "--model.attn_mask_type", "block_causal"])
    stats = auto_mesh.document_statistics(embedded, _resolved(embedded))
    assert 0.5 < stats[0] < 1 and 0 < stats[1] <= auto_mesh.SAMPLE_DOCUMENTS, stats
    assert plan_main(["--job.config_file", recipe, "--model.attn_mask_type", "block_causal",
                      "--world_size", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    want = f"attention work {stats[0]:.3f} of causal (the document lengths of training.dataset "
    assert want in out, out


def _resolved(cfg: object) -> object:
    from torchtitan_ext.validate import resolve_model_args

    return resolve_model_args(cfg)


@pytest.mark.parametrize("tile", [(2048, 32, 64), (48, 8, 16)], ids=["default", "small_tiles"])
def test_kernel_tiles_against_masked_sdpa(tile: tuple[int, int, int]) -> None:
    """The per-pair kernel alone (``block_causal.attend`` / ``attend_backward`` over every key
    block of every cp rank), on shards long enough for its tiling choices to matter: documents
    of mean 8 to 256 tokens, cp 1 to 8, every balancer, fp32, GQA, at the default tile sizes
    and at small ones. Equal to masked SDPA (forward, dq/dk/dv); every call mode (full,
    causal, mask) and the cutting of a key slice at its position jumps occur."""
    sizes = dict(zip(("max_rows", "min_rows", "min_keys"), tile, strict=True))
    s, h, hk, d, scale = 512, 4, 2, 16, 0.25
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny calls: one thread, as a cp rank has per core
    try:
        _kernel_cases(sizes, s, h, hk, d, scale)
    finally:
        torch.set_num_threads(threads)


def _kernel_cases(sizes: dict[str, int], s: int, h: int, hk: int, d: int, scale: float) -> None:
    import itertools

    from torchtitan_ext.parallel import block_causal
    from torchtitan_ext.parallel.cp_documents import DocumentMask, document_starts, layout

    seen: set[str] = set()
    balancers: set[str | None] = set()
    case = 0
    for mean in (8, 64, 256):
        for cp in (1, 2, 4, 8):
            case += 1
            gen = torch.Generator().manual_seed(case)
            tokens = torch.randint(2, 50, (2, s), generator=gen)
            tokens[torch.rand(2, s, generator=gen) < 1 / mean] = EOS
            q, k, v = (torch.randn(2, n, s, d, generator=gen) for n in (h, hk, hk))
            grad = torch.randn(2, h, s, d, generator=gen)
            starts = document_starts(tokens, EOS)
            ref = _reference(q, k, v, starts, grad)
            # Every balancer in turn; per-document head-tail at mean 256, cp 2 (a key slice
            # with a jump between runs long enough to cut).
            balancer = BALANCERS[(2 * case + 2) % len(BALANCERS)] if cp > 1 else None
            balancers.add(balancer)
            perm = layout(starts, cp, balancer)
            n = s // cp
            pos, st = DocumentMask.of(starts, perm, cp)
            out, dq = torch.zeros(2, h, s, d), torch.zeros(2, h, s, d)
            dk, dv = torch.zeros(2, hk, s, d), torch.zeros(2, hk, s, d)
            for c in range(cp):
                mine = pos[:, c]
                lq = _take(q, mine)
                acc, lse = torch.zeros(lq.shape), torch.full(lq.shape[:-1], float("-inf"))
                calls = [block_causal.tiles(mine, st[:, c], pos[:, j], **sizes) for j in range(cp)]
                for j in range(cp):
                    kj, ts = pos[:, j], calls[j]
                    seen |= {t.mode for t in ts}
                    seen |= {"cut" for a, b in itertools.pairwise(ts) if (a.b, a.q0) == (b.b, b.q0)
                             and int(kj[b.b, b.k0]) != int(kj[a.b, a.k1 - 1]) + 1}  # fmt: skip
                    block_causal.attend(acc, lse, lq, _take(k, kj), _take(v, kj),
                                        mine, st[:, c], kj, scale, calls[j])  # fmt: skip
                ldq = torch.zeros(lq.shape)
                for j in range(cp):
                    kj = pos[:, j]
                    ldk, ldv = torch.zeros(2, hk, n, d), torch.zeros(2, hk, n, d)
                    block_causal.attend_backward(
                        ldq, ldk, ldv, _take(grad, mine), lq, _take(k, kj), _take(v, kj),
                        acc, lse, mine, st[:, c], kj, scale, calls[j],
                    )  # fmt: skip
                    for b in range(2):
                        dk[b][:, kj[b]] += ldk[b]
                        dv[b][:, kj[b]] += ldv[b]
                for b in range(2):
                    out[b][:, mine[b]] = acc[b]
                    dq[b][:, mine[b]] = ldq[b]
            errs = [_rel(g, r, r) for g, r in zip((out, dq, dk, dv), ref, strict=True)]
            assert max(errs) < 1e-5, (mean, cp, balancer, errs)
    assert {"full", "causal", "mask", "cut"} <= seen, seen
    assert balancers == set(BALANCERS), balancers


def _compiled_check(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from torchtitan_ext.parallel import cp_block_causal, cp_patterns
    from torchtitan_ext.parallel.cp_documents import document_starts, layout

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    c = mesh.get_local_rank()
    for name in ("ring", "ulysses"):
        pattern = cp_patterns.make_pattern(name, world_size, 0, 0)
        cp_patterns.register(mesh, pattern)
        plan = cp_block_causal.make_plan(mesh, pattern)
        gen = torch.Generator().manual_seed(0)
        b, h, hk, d, s = 2, 8, 2, 8, 32 * world_size
        tokens = _tokens("random", b, s, world_size, gen)
        q, k, v = (torch.randn(b, n, s, d, generator=gen) for n in (h, hk, hk))
        grad = torch.randn(b, h, s, d, generator=gen)
        starts = document_starts(tokens, EOS)
        perm = layout(starts, world_size, "headtail")
        n = s // world_size
        mine = perm[:, c * n : (c + 1) * n]
        positions, mstarts = cp_block_causal.DocumentMask.of(starts, perm, world_size)

        def attention(
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            p: torch.Tensor,
            st: torch.Tensor,
            plan: cp_block_causal.Plan = plan,
        ) -> torch.Tensor:
            mask = cp_block_causal.DocumentMask(p, st)
            return cp_block_causal.block_causal_attention(q, k, v, mask, plan)

        results = []
        for fn in (attention, torch.compile(attention, fullgraph=True)):
            before = cp_patterns.calls[f"block_causal_{name}"]
            lq, lk, lv = (_take(t, mine).clone().requires_grad_() for t in (q, k, v))
            out = fn(lq, lk, lv, positions, mstarts)
            out.backward(_take(grad, mine))
            assert cp_patterns.calls[f"block_causal_{name}"] == before + 1, name
            results.append([out.detach(), *(t.grad for t in (lq, lk, lv))])
        for eager, compiled in zip(*results, strict=True):
            torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_compiled_block_causal_attention_matches_eager_under_cp() -> None:
    """Under ``torch.compile(fullgraph=True)`` (what TorchTitan's compile does to each block),
    the masked attention on 2 gloo ranks, ring and Ulysses, runs as its custom op, forward and
    backward, with the eager path's results."""
    spawn(_compiled_check, 2)


def test_compiled_blocks_train_with_the_document_mask() -> None:
    """TorchTitan's ``apply_compile`` (each block compiled whole, fullgraph) on a model with
    block-causal attention: the mask's hand-over hooks trace, and the loss and every gradient
    equal the eager run's, which differ from causal attention's."""
    from torchtitan.models.llama3.infra.parallelize import apply_compile

    from torchtitan_ext.parallel.cp_documents import shard_documents

    gen = torch.Generator().manual_seed(0)
    window = torch.randint(2, 200, (1, 64), generator=gen)
    window[0, [10, 30, 50]] = EOS
    labels = torch.roll(window, -1, dims=1)
    inputs, targets, positions, mask = shard_documents(window, labels, EOS, 1, 0, None)

    def run(model: torch.nn.Module, **kw: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(per-token losses, every parameter's gradient by its uncompiled name)."""
        logits = model(inputs, positions=positions, **kw)
        losses = F.cross_entropy(logits[0].float(), targets[0], reduction="none")
        losses.mean().backward()
        grads = {
            n.replace("._orig_mod", ""): p.grad
            for n, p in model.named_parameters()
            if p.grad is not None
        }
        return losses.detach(), grads

    eager, eager_grads = run(_tiny_model(), attention_masks=mask)
    causal, _ = run(_tiny_model())
    model = _tiny_model()

    class Compile:
        backend, components = "inductor", ["model"]

    apply_compile(model, Compile())
    compiled, grads = run(model, attention_masks=mask)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert (causal - eager).abs().max() > 1e-2  # the mask matters for these documents
    assert grads.keys() == eager_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
