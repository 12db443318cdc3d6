"""Mesh parity: every mesh shape must train the same model as one rank on the same global batch.

A *shape* is a set of degrees (pp, dp_replicate, dp_shard, tp, cp), optionally a pipeline
schedule and options, written as a name: ``pp2xdp_shard2xcp2``, ``pp4xcp2@Interleaved1F1B``,
``dp_shard2xcp2+alltoall+nolb``, ``single`` (1 rank). Shapes with the same number of ranks run
one after another inside one launch (``python -m torchtitan_ext.tools.parity --worker`` under
torchrun), because starting 8 processes costs ~25 s on a 2-core machine; each shape's metrics go
to ``<out>/<shape>/metrics.jsonl`` and are compared with the 1-rank run's, fp32: the step-1 loss
and grad norm within 1e-5 relative, steps 1..N within 5e-4 (``compare``). Every parameter's
full step-1 gradient is compared too, element by element (``GRADS_FILE``, ``grad_deviation``):
a gradient that went to the wrong place or is missing for one parameter can leave the total
norm unchanged, not these.

Used by ``scripts/parity_matrix.py`` (every factorization of 8 ranks, and a 16-rank 4D shape)
and by ``tests/test_parity.py`` (a representative subset).
"""

import argparse
import gc
import itertools
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchtitan_ext.config.manager import load_config
from torchtitan_ext.config.schema import MESH_DIM_NAMES
from torchtitan_ext.distributed import (
    clear_dtensor_caches,
    launch_env,
    run_and_exit,
    torchrun_command,
)
from torchtitan_ext.errors import ConfigError
from torchtitan_ext.metrics import read_metrics
from torchtitan_ext.parallel import cp_patterns
from torchtitan_ext.parallel.pipeline import V_SCHEDULES
from torchtitan_ext.parallel_dims import DEGREE_KEYS
from torchtitan_ext.tools.auto_mesh import choose_stage_mesh
from torchtitan_ext.validate import check_recipe, validate

ROOT = Path(__file__).resolve().parents[2]
STEP1_RTOL = 1e-5
ALL_STEPS_RTOL = 5e-4
GRAD_RTOL = 1e-5
"""Step-1 gradients: per parameter, the largest element deviation over the largest element of
the 1-rank gradient (``grad_deviation``)."""
GRADS_FILE = "grads-step1.pt"
PARAM_RTOL = 1e-4
"""Parameters after the last step: per parameter, ||p - p_ref|| / ||p_ref|| (``param_deviation``).
Every applied update is in them, so a shard updated wrongly shows here even where the losses,
norms and step-1 gradients agree (and for the V schedules, which do not validate)."""
PARAMS_FILE = "params-final.pt"
PATTERN_CALLS_FILE = "cp-pattern-calls.json"
"""Per shape: the attention forwards and backwards each CP pattern ran, summed over the ranks
(``cp_patterns.calls``): a pattern shape that fell back to torch's ring (which is numerically
right too) shows 0 and fails."""
MAX_SHAPES_PER_LAUNCH = 10

# Shape options: suffix "+name" -> recipe overrides.
OPTIONS: dict[str, list[str]] = {
    "alltoall": ["--parallelism.context_parallel_rotate_method", "alltoall"],
    "nolb": ["--parallelism.context_parallel_load_balancer", "None"],
    "nolossparallel": ["--parallelism.disable_loss_parallel"],
    "tpinner": ["--parallelism.mesh_dim_order", "pp,dp_replicate,dp_shard,cp,tp"],
    "cpinner": ["--parallelism.mesh_dim_order", "pp,dp_replicate,dp_shard,tp,cp"],
    "fullac": ["--activation_checkpoint.mode", "full"],
    # Chunked cross-entropy: chunks of 12 tokens (the local sequence is 128 / cp; the last
    # chunk of a microbatch is shorter when 12 does not divide its tokens).
    "chunkloss": ["--training.loss_chunk_tokens", "12"],
    # Tiled MLP: tiles of 12 tokens of the local sequence (the last one shorter).
    "tiledmlp": ["--training.mlp_tile_tokens", "12"],
    # Context-parallel patterns (torchtitan_ext.parallel.cp_patterns); ring is the default.
    # Also "hybrid<u>" and "dring<n>" (option_args): hybrid with Ulysses degree u, double ring
    # with inner ring n.
    "ulysses": ["--parallelism.context_parallel_pattern", "ulysses"],
    # Load balancers of block_causal (cp_documents): PTRR, per-document head-tail and LPT.
    "ptrr": ["--parallelism.context_parallel_load_balancer", "ptrr"],
    "pdht": ["--parallelism.context_parallel_load_balancer", "per_document_headtail"],
    "lpt": ["--parallelism.context_parallel_load_balancer", "per_document_lpt"],
}

BLOCK_CAUSAL = ["--model.attn_mask_type", "block_causal"]
"""``run_matrix``'s ``extra`` for a document-masked matrix (every shape and the reference)."""


def option_args(option: str) -> list[str] | None:
    """Recipe overrides of a shape option (``OPTIONS``, "hybrid<u>", "dring<n>"); None if
    unknown."""
    if option in OPTIONS:
        return OPTIONS[option]
    for prefix, pattern, key in (
        ("hybrid", "hybrid", "context_parallel_ulysses_degree"),
        ("dring", "double_ring", "context_parallel_inner_ring_degree"),
    ):
        degree = option.removeprefix(prefix)
        if option.startswith(prefix) and degree.isdigit():
            return [
                "--parallelism.context_parallel_pattern", pattern, f"--parallelism.{key}", degree
            ]  # fmt: skip
    return None


def pattern_option(pattern: str, ulysses: int = 0, inner_ring: int = 0) -> str:
    """The shape option of a context-parallel pattern and its degree: "" (the ring),
    "ulysses", "hybrid<u>" or "dring<n>"."""
    name = {"ring": "", "ulysses": "ulysses", "hybrid": "hybrid", "double_ring": "dring"}[pattern]
    inner = ulysses or inner_ring
    return name + (str(inner) if inner else "")


def pattern_options(cp: int) -> list[str]:
    """Shape options for every context-parallel pattern at degree ``cp``: "" (the ring),
    "ulysses", and "hybrid<u>" / "dring<n>" for each divisor 2 .. cp / 2 of cp."""
    return [pattern_option(*choice) for choice in cp_patterns.pattern_choices(cp)]


@dataclass(frozen=True)
class Shape:
    """A mesh shape to check.

    Attributes:
        degrees: degree per mesh dim name (missing dims are 1).
        schedule: pipeline schedule (torch's name) when pp > 1; None: the recipe's (1F1B).
        options: names from ``OPTIONS`` (or ``option_args``'s patterns).
    """

    degrees: dict[str, int] = field(hash=False)
    schedule: str | None = None
    options: tuple[str, ...] = ()

    @property
    def nproc(self) -> int:
        n = 1
        for d in self.degrees.values():
            n *= d
        return n

    @property
    def name(self) -> str:
        dims = "x".join(f"{k}{v}" for k, v in self.degrees.items() if v > 1) or "single"
        sched = f"@{self.schedule}" if self.schedule else ""
        return dims + sched + "".join(f"+{o}" for o in self.options)

    def args(self) -> list[str]:
        """Recipe overrides for this shape, in the recipe's mesh order (cp innermost by
        default) unless an option ("tpinner", "cpinner") sets it."""
        out: list[str] = []
        for dim in MESH_DIM_NAMES:
            out += [f"--parallelism.{DEGREE_KEYS[dim]}", str(self.degrees.get(dim, 1))]
        if self.schedule:
            out += ["--parallelism.pipeline_parallel_schedule", self.schedule]
        if not self.validates:
            out += ["--validation.no-enable"]
        for o in self.options:
            out += option_args(o) or []
        return out

    @property
    def validates(self) -> bool:
        """Whether the run validates: not with V schedules (``plan_pipeline`` explains)."""
        return self.schedule not in V_SCHEDULES


def parse_shape(name: str) -> Shape:
    """``"pp2xdp_shard2xcp2@1F1B+alltoall"`` -> Shape; ``"single"`` is 1 rank.

    Raises:
        ValueError: an unknown dim, option, or a degree that is not an integer >= 1.
    """
    rest, *opts = name.split("+")
    dims, _, schedule = rest.partition("@")
    degrees: dict[str, int] = {}
    if dims != "single":
        for part in dims.split("x"):
            dim = part.rstrip("0123456789")
            value = part[len(dim) :]
            if dim not in MESH_DIM_NAMES or not value.isdigit() or int(value) < 1:
                raise ValueError(f"bad shape {name!r}: {part!r} is not <dim><degree>")
            degrees[dim] = int(value)
    for o in opts:
        if option_args(o) is None:
            raise ValueError(f"bad shape {name!r}: unknown option {o!r} (known: {list(OPTIONS)})")
    ordered = {d: degrees[d] for d in MESH_DIM_NAMES if d in degrees}
    return Shape(ordered, schedule or None, tuple(opts))


def factorizations(world_size: int) -> list[Shape]:
    """Every assignment of degrees (pp, dp_replicate, dp_shard, tp, cp) whose product is
    ``world_size``, in a stable order (e.g. 35 shapes for 8 ranks)."""
    divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
    shapes = []
    for combo in itertools.product(divisors, repeat=len(MESH_DIM_NAMES)):
        n = 1
        for c in combo:
            n *= c
        if n == world_size:
            shapes.append(Shape({k: v for k, v in zip(MESH_DIM_NAMES, combo, strict=True)}))
    return shapes


def base_args(global_batch: int, steps: int, flavor: str, seq_len: int) -> list[str]:
    """The parity recipe: the debug recipe with a small model, every step logged, validation
    (2 batches) after the last step, no checkpoints or tensorboard."""
    return [
        "--job.config_file", str(ROOT / "train_configs" / "debug_cpu.toml"),
        "--model.flavor", flavor,
        "--training.seq_len", str(seq_len),
        "--training.global_batch_size", str(global_batch),
        "--training.steps", str(steps),
        "--lr_scheduler.warmup_steps", "2",
        "--metrics.log_freq", "1",
        "--validation.freq", str(steps),
        "--validation.steps", "2",
        "--validation.seq_len", str(seq_len),
        "--metrics.no-enable-tensorboard",
        "--checkpoint.no-enable",
    ]  # fmt: skip


VAL_LOCAL_BATCH = 3
"""Validation windows per forward per dp rank without PP: not a divisor of the 2 x 8
validated windows, so the last forward of most meshes is partly padding (``validate``)."""


def shape_run_args(shape: Shape, base: list[str], out: Path, global_batch: int) -> list[str]:
    """Full CLI for one shape: one optimizer step per global batch (local batch = global /
    dp), so PP has local_batch microbatches of 1. Validation covers the same 2 global batches
    of windows on every mesh; its local batch is ``VAL_LOCAL_BATCH``, or with PP the training
    one (the schedule's microbatch count)."""
    dp = shape.degrees.get("dp_replicate", 1) * shape.degrees.get("dp_shard", 1)
    local = max(1, global_batch // dp)
    val_local = local if shape.degrees.get("pp", 1) > 1 else VAL_LOCAL_BATCH
    return [
        *base,
        "--training.local_batch_size", str(local),
        "--validation.local_batch_size", str(val_local),
        "--job.dump_folder", str(out / shape.name),
        *shape.args(),
    ]  # fmt: skip


def check_shape(shape: Shape, args: list[str], training: bool = True) -> str | None:
    """None if the shape's recipe passes train.py's checks here (``validate.check_recipe``) for
    its world size, else the one-line reason. ``training=False``: only the recipe and mesh
    rules (``validate.validate``), for a dry run of a cluster that is not this machine."""
    try:
        cfg = load_config(args)
        if training:
            check_recipe(cfg, shape.nproc, mesh_planner=choose_stage_mesh)
        else:
            validate(cfg, shape.nproc)
    except ConfigError as e:
        return str(e)
    return None


def _worker(args: list[list[str]]) -> int:
    """Run every recipe in ``args`` in turn on this launch's ranks (collective)."""
    import torch.distributed as dist

    from torchtitan_ext.distributed import RankInfo, init_distributed
    from torchtitan_ext.trainer import Trainer, prepare, setup_logging

    rank = RankInfo.from_env()
    setup_logging(rank.rank)
    try:
        # Every recipe is checked before the first collective; each one's data is loaded
        # only when it runs (a tokenized corpus per recipe would not fit 8 ranks' memory).
        for a in args:
            check_recipe(load_config(a), rank.world_size, rank.local_rank, choose_stage_mesh)
        p = prepare(args[0], rank, choose_stage_mesh)
    except ConfigError as e:
        sys.stderr.write(f"[rank{rank.rank}] config error: {e}\n")
        return 2
    init_distributed(p.backend, p.device, p.cfg.comm.init_timeout_seconds)
    try:
        for i, a in enumerate(args):
            if i > 0:
                p = prepare(a, rank, choose_stage_mesh)  # the previous data is released here
            trainer = Trainer(p)
            record_first_step_grads(trainer, Path(p.cfg.job.dump_folder) / GRADS_FILE)
            cp_patterns.calls.clear()
            trainer.train()
            record_pattern_calls(Path(p.cfg.job.dump_folder) / PATTERN_CALLS_FILE)
            record_params(trainer, Path(p.cfg.job.dump_folder) / PARAMS_FILE)
            del trainer
            gc.collect()  # the trainer's reference cycles (stage closures) hold its model
            # Else the next shape's DTensors can run collectives on this shape's equal
            # meshes' process groups (propagation caches compare meshes by layout).
            clear_dtensor_caches()
            dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def record_pattern_calls(path: Path) -> None:
    """Write ``cp_patterns.calls`` summed over the ranks to ``path`` on rank 0 (collective)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(cp_patterns.calls))
    total: dict[str, int] = {}
    for counts in gathered:
        for name, n in counts.items():
            total[name] = total.get(name, 0) + n
    if dist.get_rank() == 0:
        path.write_text(json.dumps(total, sort_keys=True))


def expected_pattern(shape: Shape) -> str:
    """The CP pattern a shape's options select ("ring" unless one names another)."""
    for option in shape.options:
        args = option_args(option) or []
        if "--parallelism.context_parallel_pattern" in args:
            return args[args.index("--parallelism.context_parallel_pattern") + 1]
    return "ring"


def pattern_calls_problem(shape: Shape, dump: Path, masked: bool = False) -> str:
    """ "" if the shape's CP pattern really ran (forward and backward calls counted in
    ``PATTERN_CALLS_FILE``) and no other pattern did, else why not. A ring shape must count
    none: the ring is torch's own code. ``masked`` (a block_causal matrix): the pattern's
    block-causal attention must have run (``cp_block_causal`` counts "block_causal_<pattern>",
    the ring too), and nothing else."""
    path = dump / PATTERN_CALLS_FILE
    if not path.exists():
        return f"no pattern call counts ({path.parent.name}/{path.name})"
    calls = json.loads(path.read_text())
    want = expected_pattern(shape) if shape.degrees.get("cp", 1) > 1 else "ring"
    if masked:
        want = f"block_causal_{want}"
        others = {k: n for k, n in calls.items() if n and k.removesuffix("_backward") != want}
        if others or not (calls.get(want) and calls.get(f"{want}_backward")):
            return f"block-causal {want} did not run alone: calls {calls}"
        return ""
    others = {k: n for k, n in calls.items() if n and k.removesuffix("_backward") != want}
    if others:
        return f"other CP patterns ran: {others}"
    if want != "ring" and not (calls.get(want) and calls.get(f"{want}_backward")):
        return f"CP pattern {want} never ran (torch's ring instead): calls {calls}"
    return ""


def _full_named(trainer: Any, tensor_of: Any) -> dict[str, Any]:
    """``{canonical name: full tensor, fp32 on CPU}`` of ``tensor_of(param)`` for every
    parameter of the model (None skipped). Collective: DTensors are gathered over their mesh,
    and with PP the stages' dicts over pp."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from torchtitan_ext.models import canonical_name

    out: dict[str, torch.Tensor] = {}
    for part in trainer.model_parts:
        for name, param in part.named_parameters():
            t = tensor_of(param)
            if t is None:
                continue
            full = t.full_tensor() if isinstance(t, DTensor) else t
            out[canonical_name(name)] = full.detach().to("cpu", torch.float32).clone()
    if trainer.dims.pp_enabled:  # each pp rank holds other stages' parameters
        gathered: list[Any] = [None] * trainer.dims.pp
        dist.all_gather_object(gathered, out, group=trainer.dims.get_mesh("pp").get_group())
        out = {k: v for stage in gathered for k, v in stage.items()}
    return out


def record_params(trainer: Any, path: Path) -> None:
    """Save every parameter after the last step (full, fp32) to ``path`` on rank 0
    (collective)."""
    import torch
    import torch.distributed as dist

    params = _full_named(trainer, lambda param: param)
    if dist.get_rank() == 0:
        torch.save(params, path)


def param_deviation(dump: Path, ref_dump: Path) -> tuple[float, str]:
    """The largest, over parameters, ||p - p_ref|| / ||p_ref|| of a run's parameters after
    its last step (``PARAMS_FILE``) against the reference's.

    Returns:
        (deviation, "") or (nan, why not comparable: a file missing, other parameters).
    """
    import torch

    got_path, ref_path = dump / PARAMS_FILE, ref_dump / PARAMS_FILE
    if not ref_path.exists() or not got_path.exists():
        missing = ref_path if not ref_path.exists() else got_path
        return float("nan"), f"no final parameters ({missing.parent.name}/{missing.name})"
    got, ref = torch.load(got_path, weights_only=True), torch.load(ref_path, weights_only=True)
    if got.keys() != ref.keys():
        diff = sorted(set(got) ^ set(ref))
        return float("nan"), f"final parameters of other parameters: {diff[:4]}"
    worst = 0.0
    for name, r in ref.items():
        if got[name].shape != r.shape:
            return float("nan"), f"final {name}: {list(got[name].shape)} != {list(r.shape)}"
        worst = max(worst, float((got[name] - r).norm() / max(float(r.norm()), 1e-12)))
    return worst, ""


def record_first_step_grads(trainer: Any, path: Path) -> None:
    """Make ``trainer``'s first ``train_step`` save, right after it, to ``path`` on rank 0:
    ``{"grads": {canonical name: full gradient, fp32}, "grad_norms": every rank's grad norm}``.
    The gradients are those the step applied (after clipping, which scales them by the same
    global-norm factor on every mesh). Collective: each gradient is gathered over its mesh,
    the stages' over pp, the norms over the world."""
    import torch
    import torch.distributed as dist

    step = trainer.train_step

    def first_step(microbatches: Any) -> Any:
        out = step(microbatches)
        del trainer.train_step  # the class's method again from step 2
        grads = _full_named(trainer, lambda param: param.grad)
        norm = out[1].detach().reshape(1).to(torch.float32)
        norms = [torch.zeros_like(norm) for _ in range(dist.get_world_size())]
        dist.all_gather(norms, norm)
        if trainer.rank == 0:
            torch.save({"grads": grads, "grad_norms": torch.cat(norms).cpu()}, path)
        return out

    trainer.train_step = first_step


def grad_deviation(dump: Path, ref_dump: Path) -> tuple[float, str]:
    """The largest, over parameters, relative deviation of a run's step-1 gradients
    (``GRADS_FILE``) from the reference's: per parameter, max |g - g_ref| / max |g_ref|.
    The step's gradient norm must also be bitwise the same on every rank of the run (each
    rank clips with it and decides with it whether to step).

    Returns:
        (deviation, "") or (nan, why not comparable: a file missing, parameters that differ,
        grad norms that differ between ranks).
    """
    import torch

    got_path, ref_path = dump / GRADS_FILE, ref_dump / GRADS_FILE
    if not ref_path.exists() or not got_path.exists():
        missing = ref_path if not ref_path.exists() else got_path
        return float("nan"), f"no step-1 gradients ({missing.parent.name}/{missing.name})"
    got_file = torch.load(got_path, weights_only=True)
    got, ref = got_file["grads"], torch.load(ref_path, weights_only=True)["grads"]
    norms = got_file["grad_norms"]
    if not bool((norms == norms[0]).all()):
        return float("nan"), f"step-1 grad norm differs between ranks: {norms.tolist()}"
    if got.keys() != ref.keys():
        diff = sorted(set(got) ^ set(ref))
        return float("nan"), f"step-1 gradients of other parameters: {diff[:4]}"
    worst = 0.0
    for name, r in ref.items():
        g = got[name]
        if g.shape != r.shape:
            return float("nan"), f"step-1 gradient of {name}: {list(g.shape)} != {list(r.shape)}"
        scale = max(float(r.abs().max()), 1e-12)
        worst = max(worst, float((g - r).abs().max()) / scale)
    return worst, ""


@dataclass
class Matrix:
    """Mesh shapes compared against the 1-rank run of one recipe: the run arguments of
    ``base_args(global_batch, steps, flavor, seq_len)`` plus ``extra`` (``BLOCK_CAUSAL``: a
    document-masked matrix), every run's outputs under ``out/<shape>``."""

    shapes: list[Shape]
    out: Path
    flavor: str = "debugmodel_cpu_deep"
    extra: list[str] = field(default_factory=list)
    steps: int = 5
    global_batch: int = 8
    seq_len: int = 128

    def args(self, shape: Shape) -> list[str]:
        """train.py's arguments for ``shape``."""
        base = base_args(self.global_batch, self.steps, self.flavor, self.seq_len) + self.extra
        return shape_run_args(shape, base, self.out, self.global_batch)

    @property
    def masked(self) -> bool:
        return "block_causal" in self.extra


def launch(runs: list[tuple[Matrix, Shape]], timeout: float) -> "subprocess.CompletedProcess[str]":
    """Run the shapes of ``runs`` (all with the same number of ranks, of one or several
    matrices) in one launch: torchrun for > 1 rank, plain python for 1.

    Returns:
        The CompletedProcess (its returncode is the launch's); its output is also written to
        ``launch-<nproc>-<first shape>.log`` in the folder of every matrix with a shape in it.
    """
    nproc = runs[0][1].nproc
    assert all(s.nproc == nproc for _, s in runs)
    name = f"launch-{nproc}-{runs[0][1].name}"
    payload = runs[0][0].out / f"{name}.json"
    payload.write_text(json.dumps([m.args(s) for m, s in runs]))
    entry = ["-m", "torchtitan_ext.tools.parity", "--worker", str(payload)]
    if nproc == 1:
        cmd = [sys.executable, *entry]
    else:
        cmd = torchrun_command(nproc, ["--no-python", sys.executable, *entry])
    proc = subprocess.run(
        cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=timeout
    )
    for out in {m.out for m, _ in runs}:
        (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    return proc


NATIVE_CRASH_MARKERS = (
    "malloc(): ",
    "free(): ",
    "double free",
    "corrupted size",
    "Segmentation",
    "terminate called",
    "Aborted",
)


def native_crash(proc: "subprocess.CompletedProcess[str]") -> str | None:
    """The glibc / C++ runtime / signal message if a worker died in native code, else None.

    Such a crash fails the launch's unfinished shapes with that message (no retry):
    ``scripts/soak_native.py`` counts them over repeated launches.
    """
    for line in (proc.stderr + proc.stdout).splitlines():
        if any(m in line for m in NATIVE_CRASH_MARKERS):
            return line.strip()[:200]
    return None


def first_error_line(proc: "subprocess.CompletedProcess[str]") -> str:
    """The first worker line that names an error (not torchrun's own summary)."""
    lines = (proc.stderr + proc.stdout).splitlines()
    for line in lines:
        names_error = "Error" in line or "error:" in line
        if names_error and not any(s in line for s in ("ChildFailedError", "Traceback", "File ")):
            return line.strip()
    return lines[-1].strip() if lines else ""


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@dataclass
class Result:
    """One shape's comparison with the 1-rank reference.

    Attributes:
        shape: the shape's name; nproc: its ranks.
        status: "PASS", "FAIL" (deviation over tolerance, or missing steps), "SKIP"
            (invalid for the recipe: ``detail`` says why) or "ERROR" (the launch failed).
        step1_dev: max relative deviation of step 1's loss and grad norm.
        loss_dev, grad_norm_dev: max relative deviation over all steps.
        val_dev: relative deviation of the validation loss after the last step.
        grad_dev: step 1's gradients, the largest per-parameter deviation
            (``grad_deviation``).
        param_dev: the parameters after the last step, the largest per-parameter relative
            deviation (``param_deviation``).
    """

    shape: str
    nproc: int
    status: str
    step1_dev: float = float("nan")
    loss_dev: float = float("nan")
    grad_norm_dev: float = float("nan")
    val_dev: float = float("nan")
    grad_dev: float = float("nan")
    detail: str = ""
    param_dev: float = float("nan")


def compare(shape: Shape, dump: Path, ref_dump: Path, masked: bool = False) -> Result:
    """Compare a shape's metrics with the reference's, step by step: training loss and grad
    norm (step 1 within ``STEP1_RTOL``, all within ``ALL_STEPS_RTOL``), the validation loss
    (within ``ALL_STEPS_RTOL``), every parameter's step-1 gradient (within ``GRAD_RTOL``,
    ``grad_deviation``), the parameters after the last step (within ``PARAM_RTOL``,
    ``param_deviation``), and that the shape's CP pattern is what ran
    (``pattern_calls_problem``; ``masked``: of a block_causal matrix)."""
    got, ref = read_metrics(dump), read_metrics(ref_dump)
    got_val, ref_val = read_metrics(dump, "val"), read_metrics(ref_dump, "val")
    if [r["step"] for r in got] != [r["step"] for r in ref] or not ref:
        steps = [r["step"] for r in got]
        return Result(shape.name, shape.nproc, "FAIL", detail=f"logged steps {steps}")
    if shape.validates and (len(got_val) != len(ref_val) or not ref_val):
        return Result(shape.name, shape.nproc, "FAIL", detail=f"validations {got_val}")
    loss = [_rel(g["loss"], r["loss"]) for g, r in zip(got, ref, strict=True)]
    gn = [_rel(g["grad_norm"], r["grad_norm"]) for g, r in zip(got, ref, strict=True)]
    val = max(
        (_rel(g["loss"], r["loss"]) for g, r in zip(got_val, ref_val, strict=shape.validates)),
        default=float("nan"),
    )
    step1 = max(loss[0], gn[0])
    grad, why = grad_deviation(dump, ref_dump)
    pattern_problem = pattern_calls_problem(shape, dump, masked)
    params, params_why = param_deviation(dump, ref_dump)
    ok = step1 <= STEP1_RTOL and max(loss + gn) <= ALL_STEPS_RTOL
    ok = ok and (not shape.validates or val <= ALL_STEPS_RTOL)
    ok = ok and grad <= GRAD_RTOL  # False for nan (not comparable: ``why``)
    ok = ok and not pattern_problem
    ok = ok and params <= PARAM_RTOL  # False for nan
    why = "; ".join(w for w in (why, pattern_problem, params_why) if w)
    status = "PASS" if ok else "FAIL"
    return Result(
        shape.name, shape.nproc, status, step1, max(loss), max(gn), val, grad, why, params
    )


def run_matrix(
    shapes: list[Shape],
    out: Path,
    *,
    steps: int = 5,
    global_batch: int = 8,
    flavor: str = "debugmodel_cpu_deep",
    seq_len: int = 128,
    timeout: float = 120,
    log: Any = None,
    extra: list[str] | None = None,
) -> list[Result]:
    """``run_matrices`` of one ``Matrix`` of these fields.

    Returns:
        One Result per shape, in the given order.
    """
    m = Matrix(shapes, out, flavor, extra or [], steps, global_batch, seq_len)
    results = run_matrices({"": m}, timeout=timeout, log=log)[""]
    return [results[s.name] for s in shapes]


def run_matrices(
    matrices: dict[str, Matrix], *, timeout: float = 120, log: Any = None
) -> dict[str, dict[str, Result]]:
    """Validate, run and compare every matrix's shapes against its own 1-rank reference: the
    shapes of all matrices with the same number of ranks share launches (starting the ranks
    costs more than a shape), at most ``MAX_SHAPES_PER_LAUNCH`` per launch. A launch of n
    shapes may take ``timeout * (n + 1)`` seconds.

    Returns:
        Per matrix name, its Results by shape name.

    Raises:
        RuntimeError: a matrix's 1-rank reference produced no metrics.
    """
    single = Shape({})
    results: dict[str, dict[str, Result]] = {name: {} for name in matrices}
    by_nproc: dict[int, list[tuple[str, Shape]]] = {1: [(name, single) for name in matrices]}
    for name, m in matrices.items():
        m.out.mkdir(parents=True, exist_ok=True)
        for s in m.shapes:
            why = check_shape(s, m.args(s))
            if why is not None:
                results[name][s.name] = Result(s.name, s.nproc, "SKIP", detail=why)
            elif s.nproc > 1:
                by_nproc.setdefault(s.nproc, []).append((name, s))
    # Each mesh keeps ~15 process groups (gloo threads and buffers) alive until its launch
    # ends (torch caches groups by name, so they cannot be destroyed early): at most
    # MAX_SHAPES_PER_LAUNCH shapes share a launch.
    launches = [
        group[i : i + MAX_SHAPES_PER_LAUNCH]
        for _, group in sorted(by_nproc.items())
        for i in range(0, len(group), MAX_SHAPES_PER_LAUNCH)
    ]
    errors: dict[tuple[str, str], str] = {}
    for group in launches:
        runs = [(matrices[name], s) for name, s in group]
        limit = timeout * (1 + len(group))
        if log:
            log(f"launch: {group[0][1].nproc} rank(s), {len(group)} shape(s): "
                f"{[s.name for _, s in group]}")  # fmt: skip
        try:
            proc = launch(runs, limit)
        except subprocess.TimeoutExpired:
            for name, s in group:
                errors[(name, s.name)] = f"launch timed out after {limit:.0f}s"
            continue
        if proc.returncode != 0:
            why = native_crash(proc) or first_error_line(proc)
            for name, s in group:
                errors[(name, s.name)] = f"launch exit {proc.returncode}: {why}"
    for name, m in matrices.items():
        ref = m.out / single.name
        if not read_metrics(ref):
            why = errors.get((name, single.name))
            label = f"{name}: " if name else ""
            raise RuntimeError(f"{label}the 1-rank reference produced no metrics: {why}")
        for s in m.shapes:
            if s.name in results[name]:
                continue
            res = compare(s, m.out / s.name, ref, m.masked)
            if (name, s.name) in errors and res.status != "PASS":
                res = Result(s.name, s.nproc, "ERROR", detail=errors[(name, s.name)][-300:])
            results[name][s.name] = res
    return results


def format_table(results: list[Result]) -> str:
    """A Markdown table: shape, ranks, deviations (relative), status."""
    lines = [
        "| shape | ranks | step-1 dev | max loss dev | max grad-norm dev | val-loss dev "
        "| step-1 grads dev | status |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        status = r.status if not r.detail else f"{r.status}: {r.detail}"
        lines.append(
            f"| {r.shape} | {r.nproc} | {r.step1_dev:.1e} | {r.loss_dev:.1e} | "
            f"{r.grad_norm_dev:.1e} | {r.val_dev:.1e} | {r.grad_dev:.1e} | {status} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worker", type=Path, help="internal: JSON list of recipes to run")
    a = ap.parse_args(argv)
    if a.worker is None:
        ap.error("use scripts/parity_matrix.py")
    payload = json.loads(a.worker.read_text())
    run_and_exit(lambda: _worker(payload))


if __name__ == "__main__":
    main()
