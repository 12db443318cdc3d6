"""Every check that needs a GPU, in one command, printed as one table.

    bash scripts/gpu_check.sh                  # all checks (aim: under 8 minutes on one H100/H200)
    bash scripts/gpu_check.sh --only lse_layouts,tokens_per_s
    bash scripts/gpu_check.sh --list           # the checks (also without a GPU)

Run it when a GPU is lent (``../shared/gpu/README.md``: ``prepare.sh`` here, carry ``.gpu``;
the .sh sources ``.gpu/env.sh`` when present); never in CI. Without CUDA it stops before the
first check with one line and exit status 3. A check that fails or cannot run is a FAIL row
with its first error line (exit status 1); the others still run. The table is also written to
``outputs/gpu_check.md``.

The checks (``CHECKS``; to add one, write a function ``(args) -> list[Row]`` and an entry):

- ``lse_layouts``: the log-sum-exp each CUDA SDPA kernel returns (flash, memory-efficient,
  cuDNN: the aten ops ``_scaled_dot_product_{flash,efficient,cudnn}_attention``, and the same
  kernel chosen through ``torch.nn.attention.sdpa_kernel``), one rank, bf16, causal, at a
  sequence length that is a multiple of 32 and one that is not (the efficient kernel pads its
  LSE to a multiple of 32; cuDNN returns (B, H, S, 1); flash (B, H, S)). Each LSE is compared
  with an fp32 reference, then passed through what the CP patterns do with it
  (``torchtitan_ext.parallel.cp_ulysses``): ``check_kernel_lse``, the Ulysses / hybrid
  exchange of the LSE (``cp_lse.LseLayout``, ``_lse_to_seq`` and ``_lse_to_heads``, with u = 2 and 4
  ranks played by threads in memory, head-tail ordered), which must give the kernel's own
  tensor back bit for bit, padding included; the double ring's merge of two key blocks with
  torch's ``_SDPAMerger``
  (whole queries, and the second half of the queries as ``_double_ring_forward`` does for a
  later group), and ``_halve`` of the LSE as ``_double_ring_backward`` does
  (``cp_double_ring``).
- ``long_context_memory``: ``docs/long_context.md``'s memory question on the 1.2B flavor
  (``train_configs/llama3_1b_long_context_1gpu.toml``, bf16, full AC, no compile): step
  memory at two lengths with the features off, with chunked loss + tiled MLP, and with
  activation offload on top (``scripts/bench_long_context.py``'s worker and fit), and the
  longest sequence each setting's slope fits in the GPU's memory.
- ``tokens_per_s``: tokens/s of our ``train.py`` against TorchTitan 0.2.2's own trainer
  (``python -m torchtitan.train`` with ``torchtitan_ext.tools.titan_baseline`` imported for
  the flavor, the corpus and the byte tokenizer) on the same recipe: the 1.2B flavor, seq
  8192 x 2, selective op AC, eager, a few steps each; the median of the steps after the first
  two.
- ``titan_options``: TorchTitan recipe options of issue 25 on the same recipe, each against
  the run without it, tokens/s and peak memory: ``model.converters = ["float8"]`` (compiled,
  against the compiled baseline; needs torchao: add its wheel to ``.gpu/whl``, e.g.
  ``pip download --no-deps torchao -d .gpu/whl``, the cp310-abi3 wheel installs on 3.12),
  ``training.enable_cpu_offload`` (FAIL unless its peak memory is below the baseline's) and
  ``profiling.enable_memory_snapshot`` (FAIL unless the last step's
  ``memory_snapshot/iteration_<steps>/rank0_memory_snapshot.pickle`` is a snapshot with
  segments).
"""

import argparse
import dataclasses
import importlib.util
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RECIPE_1B = ROOT / "train_configs" / "llama3_1b_long_context_1gpu.toml"
NO_CUDA_STATUS = 3


@dataclasses.dataclass
class Row:
    """One line of the table: ``check``, ``case``, the measured ``value``, ``status`` ("ok",
    "FAIL" or "info") and a ``note``."""

    check: str
    case: str
    value: str
    status: str
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    what: str
    minutes: float
    """Expected wall time on one H100 / H200 (an estimate until measured)."""
    run: Callable[[argparse.Namespace], list[Row]]


# ---- lse_layouts ---------------------------------------------------------------------------


def _kernels() -> list[tuple[str, Any, Callable[..., tuple[Any, Any]]]]:
    """(name, SDPBackend, op(q, k, v, causal) -> (out, lse)) of the three CUDA kernels."""
    import torch
    from torch.nn.attention import SDPBackend

    aten = torch.ops.aten

    def flash(q: Any, k: Any, v: Any, causal: bool) -> tuple[Any, Any]:
        r = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)
        return r[0], r[1]

    def efficient(q: Any, k: Any, v: Any, causal: bool) -> tuple[Any, Any]:
        r = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)
        return r[0], r[1]

    def cudnn(q: Any, k: Any, v: Any, causal: bool) -> tuple[Any, Any]:
        r = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)
        return r[0], r[1]

    return [
        ("flash", SDPBackend.FLASH_ATTENTION, flash),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION, efficient),
        ("cudnn", SDPBackend.CUDNN_ATTENTION, cudnn),
    ]


def _reference(q: Any, k: Any, v: Any, causal: bool) -> tuple[Any, Any]:
    """fp32 attention of the bf16 inputs: (out (B, H, S, D), lse (B, H, S))."""
    import torch

    qf, kf, vf = (t.float() for t in (q, k, v))
    scores = qf @ kf.transpose(-1, -2) / qf.shape[-1] ** 0.5
    if causal:
        s, t = scores.shape[-2:]
        mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1)
    return (scores - lse.unsqueeze(-1)).exp() @ vf, lse


def _as_bhs(lse: Any, s: int) -> Any:
    """A kernel's LSE as (B, H, S) fp32: drop cuDNN's trailing 1, cut the padding."""
    lse = lse.squeeze(-1) if lse.dim() == 4 else lse
    return lse[..., :s].float()


def _err(a: Any, b: Any) -> float:
    return float((a.float() - b.float()).abs().max())


def _compare(check: str, case: str, got: Callable[[], tuple[Any, Any]], tol: float) -> Row:
    """Run ``got`` -> (value, reference); a row with the max abs error, FAIL with the first
    error line when it raises (a layout a helper does not take)."""
    try:
        value, ref = got()
        if value.shape != ref.shape:
            return Row(check, case, f"shape {tuple(value.shape)}", "FAIL",
                       f"expected {tuple(ref.shape)}")  # fmt: skip
        err = _err(value, ref)
        return Row(check, case, f"max abs err {err:.1e}", "ok" if err <= tol else "FAIL",
                   f"tolerance {tol:g}")  # fmt: skip
    except Exception as e:  # the row reports it
        return Row(check, case, "error", "FAIL", _first_line(e))


@dataclasses.dataclass
class _Inputs:
    """One sequence length's bf16 q, k, v (B, H, S, D) and fp32 references: causal (``ref``),
    non-causal over all keys (``full``), and the first query half against the first key half
    (``first``)."""

    s: int
    q: Any
    k: Any
    v: Any
    ref: tuple[Any, Any]
    full: tuple[Any, Any]
    first: tuple[Any, Any]

    @property
    def half(self) -> int:
        return self.s // 2


def _inputs(s: int) -> _Inputs:
    import torch

    b, h, d = 2, 8, 64
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    n = s // 2
    first = _reference(q[:, :, :n], k[:, :, :n], v[:, :, :n], False)
    return _Inputs(s, q, k, v, _reference(q, k, v, True), _reference(q, k, v, False), first)


def _flat(out: Any, lse: Any, s: int) -> Any:
    import torch

    return torch.cat([out.float().flatten(), _as_bhs(lse, s).flatten()])


def _kernel_rows(kernel: str, backend: Any, op: Any, t: _Inputs) -> list[Row]:
    """The rows of one kernel at one length (see the module doc, ``lse_layouts``)."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor.experimental._context_parallel._attention import _SDPAMerger
    from torch.nn.attention import sdpa_kernel

    from torchtitan_ext.parallel import cp_double_ring, cp_ulysses

    name, case, s, n = "lse_layouts", f"{kernel} S={t.s}", t.s, t.half
    try:
        out, lse = op(t.q, t.k, t.v, True)
    except RuntimeError as e:
        return [Row(name, case, "kernel unavailable", "info", _first_line(e))]
    rows = [Row(name, f"{case}: LSE layout", f"{tuple(lse.shape)} {lse.dtype}", "info",
                "torch's ring and merger expect (B, H, S)")]  # fmt: skip

    def vs_reference() -> tuple[Any, Any]:
        return _flat(out, lse, s), _flat(*t.ref, s)

    def via_sdpa_kernel() -> tuple[Any, Any]:
        with sdpa_kernel(backend):
            got = F.scaled_dot_product_attention(t.q, t.k, t.v, is_causal=True)
        return got, out

    def ulysses_exchange(u: int) -> Row:
        check = f"{case}: check_kernel_lse, Ulysses u={u}"
        try:
            err = cp_ulysses.check_kernel_lse(
                lambda q, k, v, is_causal: op(q, k, v, is_causal), t.q, t.k, t.v,
                ulysses_degree=u, is_causal=True,
            )  # fmt: skip
        except Exception as e:  # the row reports it
            return Row(name, check, "error", "FAIL", _first_line(e))
        return Row(name, check, f"max abs err {err:.1e}", "ok" if err <= 2e-2 else "FAIL",
                   "tolerance 0.02 (bf16)")  # fmt: skip

    def merged() -> tuple[Any, Any]:
        merger = _SDPAMerger(True, seq_dim=2)
        for lo, hi in ((0, n), (n, s)):
            o, block_lse = op(t.q, t.k[:, :, lo:hi], t.v[:, :, lo:hi], False)
            merger.step(o, block_lse, False)
        return _flat(*merger.results(), s), _flat(*t.full, s)

    def merged_q_half() -> tuple[Any, Any]:
        # The first key half for all queries, then the second key half for the second half
        # of the queries only (partial=True), as _double_ring_forward's q_half blocks.
        merger = _SDPAMerger(True, seq_dim=2)
        o, block_lse = op(t.q, t.k[:, :, :n], t.v[:, :, :n], False)
        merger.step(o, block_lse, False)
        o, block_lse = op(t.q[:, :, n:], t.k[:, :, n:], t.v[:, :, n:], False)
        merger.step(o, block_lse, True)
        want_out = torch.cat([t.first[0], t.full[0][:, :, n:]], dim=2)
        want_lse = torch.cat([t.first[1], t.full[1][:, :, n:]], dim=2)
        return _flat(*merger.results(), s), _flat(want_out, want_lse, s)

    def halved() -> tuple[Any, Any]:
        return _as_bhs(cp_double_ring._halve(lse, 2, True), s - n), t.ref[1][:, :, n:]

    rows.append(_compare(name, f"{case}: out, LSE vs fp32", vs_reference, 2e-2))
    rows.append(_compare(name, f"{case}: sdpa_kernel = aten op", via_sdpa_kernel, 1e-3))
    rows += [ulysses_exchange(u) for u in (2, 4)]
    rows.append(_compare(name, f"{case}: _SDPAMerger, 2 key blocks", merged, 2e-2))
    rows.append(_compare(name, f"{case}: _SDPAMerger, q half", merged_q_half, 2e-2))
    rows.append(_compare(name, f"{case}: _halve(LSE), second half", halved, 2e-2))
    return rows


def check_lse_layouts(a: argparse.Namespace) -> list[Row]:
    import torch

    torch.manual_seed(0)
    rows: list[Row] = []
    # A multiple of 32 and a length that is not (the efficient kernel pads its LSE to 32).
    for s in (1024, 1000):
        t = _inputs(s)
        for kernel, backend, op in _kernels():
            rows += _kernel_rows(kernel, backend, op, t)
    return rows


# ---- long_context_memory -------------------------------------------------------------------

MEMORY_SETTINGS: dict[str, list[str]] = {
    "off": ["--training.loss_chunk_tokens", "0", "--training.mlp_tile_tokens", "0",
            "--activation_checkpoint.no-enable-cpu-offload"],
    "chunked loss + tiled MLP": ["--activation_checkpoint.no-enable-cpu-offload"],
    "+ activation offload": [],
}  # fmt: skip
"""The rows of docs/long_context.md's 1.2B table, on top of the recipe (which has all three)."""


def _bench_long_context() -> Any:
    spec = importlib.util.spec_from_file_location(
        "bench_long_context", ROOT / "scripts" / "bench_long_context.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_long_context_memory(a: argparse.Namespace) -> list[Row]:
    import torch

    bench = _bench_long_context()
    short, long = a.memory_seq_lens
    gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    rows: list[Row] = []
    for setting, flags in MEMORY_SETTINGS.items():
        got = {}
        for n in (short, long):
            args = [
                "--job.config_file", str(RECIPE_1B),
                "--job.dump_folder", tempfile.mkdtemp(prefix="gpu_check-"),
                "--training.seq_len", str(n), "--compile.no-enable",
                "--metrics.no-enable-tensorboard", *flags,
            ]  # fmt: skip
            got[n] = bench.measure(1, args)
        slope = (got[long]["mib"] - got[short]["mib"]) / (long - short)  # MiB per token
        intercept = got[long]["mib"] - slope * long
        reach = (gib * 1024 - max(intercept, 0.0)) / slope if slope > 0 else float("inf")
        rows.append(Row(
            "long_context_memory", f"1.2B {setting}",
            f"step {got[short]['mib'] / 1024:.1f} / {got[long]['mib'] / 1024:.1f} GiB at "
            f"{short} / {long}; {slope * 1024:.0f} KiB/token",
            "info",
            f"a step's activations fit {reach:,.0f} tokens in {gib:.0f} GiB (linear fit; "
            f"{long / got[long]['seconds']:,.0f} tokens/s at {long})",
        ))  # fmt: skip
    return rows


# ---- tokens_per_s --------------------------------------------------------------------------

TPS_SHAPE = {"seq_len": 8192, "batch": 2}


def ours_args(steps: int, dump: Path, extra: list[str] | None = None) -> list[str]:
    """train.py's recipe arguments for ``TPS_SHAPE`` on the 1.2B flavor (selective op AC,
    eager, the long-context features off), then ``extra``."""
    s = TPS_SHAPE
    return [
        "--job.config_file", str(RECIPE_1B),
        "--job.dump_folder", str(dump), "--training.seq_len", str(s["seq_len"]),
        "--training.local_batch_size", str(s["batch"]),
        "--training.global_batch_size", str(s["batch"]), "--training.steps", str(steps),
        "--training.loss_chunk_tokens", "0", "--training.mlp_tile_tokens", "0",
        "--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option",
        "op", "--activation_checkpoint.no-enable-cpu-offload", "--compile.no-enable",
        "--model.rope_theta", "0", "--metrics.no-enable-tensorboard", *(extra or []),
    ]  # fmt: skip


def _train_ours(args: list[str]) -> tuple[float, float]:
    """Run train.py on one GPU: (median tokens/s of the steps after the first two, the
    largest peak memory logged, MiB)."""
    from torchtitan_ext.distributed import launch_env, torchrun_command

    dump = Path(args[args.index("--job.dump_folder") + 1])
    _run(torchrun_command(1, [str(ROOT / "train.py"), *args]), launch_env(), "train.py")
    records = [json.loads(x) for x in (dump / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    tps = [r["tokens_per_sec"] for r in train if r["step"] > 2]
    return statistics.median(tps), max(r["peak_mem_mib"] for r in train)


def _ours(a: argparse.Namespace, dump: Path) -> float:
    return _train_ours(ours_args(a.steps, dump))[0]


def _titan_toml(a: argparse.Namespace, dump: Path) -> str:
    s = TPS_SHAPE
    return f"""
[job]
dump_folder = "{dump}"
description = "gpu_check: TorchTitan 0.2.2 baseline"

[metrics]
log_freq = 1
disable_color_printing = true

[model]
name = "llama3"
flavor = "1.2B"

[optimizer]
name = "AdamW"
lr = 3e-4
eps = 1e-8
weight_decay = 0.1
implementation = "fused"

[lr_scheduler]
warmup_steps = 2

[training]
dataset = "python_stdlib"
local_batch_size = {s["batch"]}
global_batch_size = {s["batch"]}
seq_len = {s["seq_len"]}
max_norm = 1.0
steps = {a.steps}
mixed_precision_param = "bfloat16"
mixed_precision_reduce = "float32"

[parallelism]
data_parallel_shard_degree = -1

[activation_checkpoint]
mode = "selective"
selective_ac_option = "op"

[compile]
enable = false

[checkpoint]
enable = false

[experimental]
custom_import = "torchtitan_ext.tools.titan_baseline"
"""


def _titan(a: argparse.Namespace, dump: Path) -> float:
    from torchtitan_ext.distributed import launch_env

    recipe = dump / "titan.toml"
    dump.mkdir(parents=True, exist_ok=True)
    recipe.write_text(_titan_toml(a, dump))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "1", "-m", "torchtitan.train", "--job.config_file", str(recipe)]  # fmt: skip
    out = _run(cmd, launch_env(), "torchtitan.train")
    steps = re.findall(r"step:\s*(\d+)\s.*?tps: ([\d,]+)", out)
    tps = [float(t.replace(",", "")) for step, t in steps if int(step) > 2]
    if not tps:
        raise RuntimeError(f"no 'tps:' in TorchTitan's log: {out[-500:]}")
    return statistics.median(tps)


def check_tokens_per_s(a: argparse.Namespace) -> list[Row]:
    s = TPS_SHAPE
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        ours = _ours(a, Path(tmp) / "ours")
        titan = _titan(a, Path(tmp) / "titan")
    case = f"1.2B seq {s['seq_len']} x {s['batch']}, selective op AC, eager"
    ratio = ours / titan
    return [
        Row("tokens_per_s", f"{case}: ours", f"{ours:,.0f} tokens/s", "info"),
        Row("tokens_per_s", f"{case}: TorchTitan 0.2.2", f"{titan:,.0f} tokens/s", "info"),
        Row("tokens_per_s", f"{case}: ours / TorchTitan", f"{ratio:.3f}",
            "ok" if ratio >= a.min_ratio else "FAIL", f">= {a.min_ratio:g}"),
    ]  # fmt: skip


# ---- block_causal --------------------------------------------------------------------------


def check_block_causal(a: argparse.Namespace) -> list[Row]:
    """The block-causal kernel's CUDA path (the efficient kernel with an additive bias, and
    its causal diagonal), forward and dq/dk/dv, bf16 GQA, against fp32 masked SDPA; then its
    time against causal flash SDPA at the same length (the ratio docs/context_parallel.md's
    bench prints for CPU)."""
    import time

    import torch
    import torch.nn.functional as F

    from torchtitan_ext.parallel.cp_block_causal import block_causal_attention, make_plan
    from torchtitan_ext.parallel.cp_documents import shard_documents
    from torchtitan_ext.parallel.cp_groups import CPPattern

    rows: list[Row] = []
    gen = torch.Generator().manual_seed(0)
    plan = make_plan(None, CPPattern("ring", 1))
    for s, mean in ((4096, 512), (16384, 1024)):
        tokens = torch.randint(2, 1000, (1, s), generator=gen)
        tokens[torch.rand(1, s, generator=gen) < 1 / mean] = 1
        _, _, _, mask = shard_documents(tokens, tokens, 1, 1, 0, None)
        mask = type(mask)(*(t.cuda() for t in mask))
        q, k, v = (torch.randn(1, h, s, 128, generator=gen).cuda().bfloat16() for h in (32, 8, 8))
        dout = torch.randn(1, 32, s, 128, generator=gen).cuda().bfloat16()
        pos = torch.arange(s, device="cuda")
        starts = mask.starts[0, 0]
        visible = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= starts[:, None])
        rq, rk, rv = (t.float().requires_grad_() for t in (q, k, v))
        ref = F.scaled_dot_product_attention(rq, rk, rv, attn_mask=visible, enable_gqa=True)
        ref.backward(dout.float())
        lq, lk, lv = (t.clone().requires_grad_() for t in (q, k, v))
        out = block_causal_attention(lq, lk, lv, mask, plan)
        out.backward(dout)
        for name, got, want in (("out", out, ref), ("dq", lq.grad, rq.grad),
                                ("dk", lk.grad, rk.grad), ("dv", lv.grad, rv.grad)):  # fmt: skip
            err = _err(got, want)
            rows.append(Row("block_causal", f"S {s} mean doc {mean}: {name}",
                            f"max abs err {err:.1e}", "ok" if err <= 5e-2 else "FAIL"))  # fmt: skip

        def timed(fn: Callable[[], Any]) -> float:
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / 3

        def run_masked(q: Any = q, k: Any = k, v: Any = v, mask: Any = mask) -> Any:
            return block_causal_attention(q, k, v, mask, plan)

        def run_causal(q: Any = q, k: Any = k, v: Any = v) -> Any:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        masked, causal = timed(run_masked), timed(run_causal)
        rows.append(Row("block_causal", f"S {s} mean doc {mean}: forward time",
                        f"{masked / causal:.2f} x causal", "info",
                        f"{masked * 1e3:.1f} ms vs {causal * 1e3:.1f} ms"))  # fmt: skip
    return rows


# ---- titan_options -------------------------------------------------------------------------

TITAN_OPTIONS: dict[str, list[str]] = {
    "baseline (compiled)": ["--compile.enable"],
    # TorchTitan's float8 recipe (llama3_405b.toml): tensorwise, the output layer kept in bf16;
    # compiled, as TorchTitan runs float8.
    "float8 (compiled)": ["--compile.enable", "--model.converters", "float8",
                          "--quantize.linear.float8.filter_fqns", "output"],
    "baseline": [],
    "CPU offload": ["--training.enable_cpu_offload"],
    "memory snapshot": ["--profiling.enable_memory_snapshot"],
}  # fmt: skip
"""issue 25's options on top of ``ours_args`` (the tokens_per_s recipe), each against the
baseline above it: float8 against the compiled baseline, the others against the eager one."""


def _snapshot_problem(dump: Path, step: int) -> str | None:
    """Why the memory snapshot of ``step`` is missing or unreadable (None when it is a
    torch.cuda.memory._snapshot() pickle with segments)."""
    import pickle

    path = dump / "memory_snapshot" / f"iteration_{step}" / "rank0_memory_snapshot.pickle"
    if not path.is_file():
        return f"no {path.relative_to(dump)}"
    with path.open("rb") as f:
        snapshot = pickle.load(f)
    if not snapshot.get("segments"):
        return f"{path.name} has no segments"
    return None


def check_titan_options(a: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    got: dict[str, tuple[float, float]] = {}
    base_of = {"float8 (compiled)": "baseline (compiled)"}
    s = TPS_SHAPE
    for name, extra in TITAN_OPTIONS.items():
        case = f"1.2B seq {s['seq_len']} x {s['batch']}: {name}"
        with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
            dump = Path(tmp) / "run"
            snapshot = ["--profiling.profile_freq", str(a.steps)] if "snapshot" in name else []
            try:
                got[name] = _train_ours(ours_args(a.steps, dump, [*extra, *snapshot]))
            except Exception as e:  # the row reports it; the other settings still run
                rows.append(Row("titan_options", case, "error", "FAIL", _first_line(e)))
                continue
            problem = _snapshot_problem(dump, a.steps) if snapshot else None
        tps, mib = got[name]
        base = base_of.get(name, "baseline")
        value = f"{tps:,.0f} tokens/s, peak {mib / 1024:.1f} GiB"
        if name == base or base not in got:
            rows.append(Row("titan_options", case, value, "info"))
            continue
        b_tps, b_mib = got[base]
        note = f"vs {base}: tokens/s x {tps / b_tps:.2f}, peak memory x {mib / b_mib:.2f}"
        ok = problem is None and (name != "CPU offload" or mib < b_mib)
        if problem is not None:
            note += f"; {problem}"
        elif name == "CPU offload" and mib >= b_mib:
            note += "; expected less peak memory than the baseline"
        rows.append(Row("titan_options", case, value, "ok" if ok else "FAIL", note))
    return rows


# ---- driver --------------------------------------------------------------------------------

CHECKS: dict[str, Check] = {
    c.name: c
    for c in (
        Check("lse_layouts", "flash / efficient / cuDNN LSE through the CP patterns' LSE handling",
              0.5, check_lse_layouts),
        Check("long_context_memory", "docs/long_context.md's memory table, 1.2B flavor", 3.5,
              check_long_context_memory),
        Check("tokens_per_s", "train.py vs TorchTitan's torchtitan.train, same recipe", 3.5,
              check_tokens_per_s),
        Check("block_causal", "document-masked attention's CUDA kernel path vs masked SDPA",
              0.5, check_block_causal),
        Check("titan_options", "float8, FSDP CPU offload, a memory snapshot: tokens/s, peak",
              4.0, check_titan_options),
    )
}  # fmt: skip


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def _run(cmd: list[str], env: dict[str, str], what: str) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"{what} exited {proc.returncode}: {' | '.join(tail)}")
    return proc.stdout + proc.stderr


def format_table(rows: list[Row]) -> str:
    lines = ["| check | case | value | status | note |", "|---|---|---|---|---|"]
    lines += [f"| {r.check} | {r.case} | {r.value} | {r.status} | {r.note} |" for r in rows]
    return "\n".join(lines) + "\n"


def cuda_problem() -> str | None:
    """Why the checks cannot run here (no CUDA), or None."""
    import torch

    if not torch.cuda.is_available():
        return (
            f"gpu_check: needs a CUDA GPU, and torch {torch.__version__} sees none "
            f"(torch.cuda.is_available() is False): no check run"
        )
    return None


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/gpu_check.sh", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    ap.add_argument("--list", action="store_true", help="list the checks and exit")
    ap.add_argument("--only", default="", help="comma-separated check names (default: all)")
    ap.add_argument("--steps", type=int, default=8, help="tokens_per_s: steps per trainer")
    ap.add_argument("--min-ratio", type=float, default=0.95,
                    help="tokens_per_s: ours / TorchTitan at least this")  # fmt: skip
    ap.add_argument("--memory-seq-lens", type=int, nargs=2, default=[16384, 32768],
                    help="long_context_memory: the two lengths of the fit")  # fmt: skip
    a = ap.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"gpu_check: unknown check {unknown[0]!r}; the checks: {', '.join(CHECKS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    if a.list:
        for c in CHECKS.values():
            print(f"{c.name:20s} ~{c.minutes:g} min  {c.what}")
        return 0
    problem = cuda_problem()
    if problem is not None:
        print(problem, file=sys.stderr)
        return NO_CUDA_STATUS
    rows: list[Row] = []
    for name in names:
        started = time.perf_counter()
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            rows += CHECKS[name].run(a)
        except Exception as e:  # a FAIL row; the other checks still run
            rows.append(Row(name, "-", "error", "FAIL", _first_line(e)))
        rows.append(Row(name, "wall time", f"{time.perf_counter() - started:.0f} s", "info"))
    table = format_table(rows)
    sys.stdout.write(table)
    out = ROOT / "outputs" / "gpu_check.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
