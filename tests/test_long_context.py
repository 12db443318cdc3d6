"""The long-context memory features against their plain references, forward and every gradient:
chunked cross-entropy and tiled MLP in one process, then inside a whole model under tensor
parallel (with and without loss parallel) on 2 real gloo ranks, compared parameter by
parameter with the unsharded model. Whole-run parity on TP/CP/PP/FSDP meshes is in
tests/test_parity.py; the memory they save is measured by scripts/bench_long_context.py."""

import copy
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.conftest import spawn
from torchtitan_ext.distributed import CUDA_ALLOC_CONF, configure_cuda_allocator

if TYPE_CHECKING:
    from torchtitan.models.llama3 import Transformer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_chunked_cross_entropy_matches_the_unchunked_loss():
    from torch import nn
    from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss

    from torchtitan_ext.long_context.chunked_loss import (
        ChunkedCrossEntropy,
        defer_output_projection,
    )

    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = IGNORE_INDEX
    ref = cross_entropy_loss(head(hidden), labels)
    ref.backward()
    ref_grads = [hidden.grad.clone(), head.weight.grad.clone()]  # type: ignore[union-attr]
    hidden.grad, head.weight.grad = None, None

    holder = nn.Module()
    holder.output = head
    defer_output_projection(holder)
    assert torch.equal(head(hidden), hidden)  # the projection moved into the loss
    loss = ChunkedCrossEntropy(head, chunk_tokens=7)(head(hidden), labels)  # 33 = 7 x 4 + 5
    loss.backward()
    assert _rel(loss.detach(), ref.detach()) < 1e-6
    for got, want in zip([hidden.grad, head.weight.grad], ref_grads, strict=True):
        assert got is not None and _rel(got, want) < 1e-6


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created under the mode and still alive: ``live`` now and
    ``peak`` (the CPU counterpart of CUDA's ``max_memory_allocated`` for what the mode runs).
    An op's output that shares an input's storage (a view) adds nothing; a storage is counted
    until torch frees it (a weakref on its Python object, which torch keeps while the storage
    lives)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._live: set[int] = set()

    def _freed(self, ptr: int, nbytes: int) -> None:
        self.live -= nbytes
        self._live.discard(ptr)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs or {}))
                  if isinstance(t, torch.Tensor)}  # fmt: skip
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if ptr in inputs or ptr in self._live or nbytes == 0:
                continue
            self._live.add(ptr)
            self.live += nbytes
            weakref.finalize(storage, self._freed, ptr, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def test_chunked_loss_holds_one_hidden_gradient_chunk_grad_peak():
    """The chunked loss's forward holds the hidden states' gradient (B, S, dim) once: each
    chunk's part is written into one buffer, not concatenated from a list of chunks (which
    holds it twice at the concatenation, as ``tools.dry_run`` does not count)."""
    from torch import nn

    from torchtitan_ext.long_context.chunked_loss import ChunkedCrossEntropy

    torch.manual_seed(0)
    batch, seq, dim, vocab, chunk = 2, 512, 64, 32, 64
    head = nn.Linear(dim, vocab, bias=False)
    hidden = torch.randn(batch, seq, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    grad_bytes = hidden.numel() * hidden.element_size()
    with _LiveBytes() as mem:
        loss = ChunkedCrossEntropy(head, chunk)(hidden, labels)
    # One chunk's logits, log-softmax and gradients (chunk x vocab, chunk x dim) and the weight's
    # gradient are small next to the (B, S, dim) gradient here.
    assert grad_bytes <= mem.peak < 1.5 * grad_bytes, (mem.peak, grad_bytes)
    loss.backward()
    assert hidden.grad is not None and hidden.grad.shape == hidden.shape


def test_tiled_mlp_matches_the_feed_forward():
    from torchtitan.models.llama3.model.model import FeedForward

    from torchtitan_ext.long_context.tiled_mlp import TiledFeedForward

    torch.manual_seed(0)
    ref = FeedForward(dim=16, hidden_dim=64, multiple_of=8, ffn_dim_multiplier=None)
    tiled = copy.deepcopy(ref)
    tiled.__class__ = TiledFeedForward
    assert isinstance(tiled, TiledFeedForward)
    tiled.tile_tokens = 5
    x = torch.randn(2, 13, 16)
    outs, grads = [], []
    for module in (ref, tiled):
        xi = x.clone().requires_grad_()
        out = module(xi)
        (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad, *(p.grad for p in module.parameters())])
    assert _rel(outs[1], outs[0]) < 1e-6
    for got, want in zip(grads[1], grads[0], strict=True):
        assert got is not None and want is not None and _rel(got, want) < 1e-6


def test_tiled_mlp_under_full_ac_runs_each_tile_twice_tiled_recompute(monkeypatch, tmp_path):
    """Under full activation checkpointing, a training step runs each tiled feed-forward twice
    (forward, and one recompute in backward, tile by tile), not three times (the block's
    recompute running the tiles once more before each tile's own), with the gradients of the
    untiled model."""
    from torchtitan.components.loss import cross_entropy_loss

    from torchtitan_ext.config import load_config
    from torchtitan_ext.long_context.tiled_mlp import TiledFeedForward, apply_tiled_mlp
    from torchtitan_ext.parallel import activation_checkpoint as ac_module

    base, args = _tiny_model()
    tokens = torch.randint(0, args.vocab_size, (2, 33))
    ac_cfg = load_config(["--activation_checkpoint.mode", "full"]).activation_checkpoint
    tiles = 0
    tile = TiledFeedForward._tile

    def counted(self: TiledFeedForward, *args: torch.Tensor) -> torch.Tensor:
        nonlocal tiles
        tiles += 1
        return tile(self, *args)

    monkeypatch.setattr(TiledFeedForward, "_tile", counted)
    grads = []
    for tiled in (False, True):
        model = copy.deepcopy(base)
        if tiled:
            apply_tiled_mlp(model, tile_tokens=10)  # 32 tokens: tiles of 10, 10, 10 and 2
        ac_module.apply_ac(model, ac_cfg, compile_enabled=False, dump_folder=str(tmp_path))
        cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        grads.append([p.grad for p in model.parameters()])
    per_forward = 4 * args.n_layers
    assert tiles == 2 * per_forward, (tiles, per_forward)
    for got, want in zip(*grads, strict=True):
        assert got is not None and want is not None and _rel(got, want) < 1e-6


def _tiny_model() -> tuple["Transformer", Any]:
    """TorchTitan's Llama on the ``debugmodel_cpu_tiny`` flavor (32-token sequences), seeded
    and initialized: (model, its args)."""
    from torchtitan.models.llama3 import Transformer

    from torchtitan_ext.models import CPU_FLAVORS

    args = copy.deepcopy(CPU_FLAVORS["debugmodel_cpu_tiny"])
    args.max_seq_len = 32
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        model.init_weights()
    return model, args


def _tp_features_match(rank: int, world_size: int) -> None:
    """A debug model with both features under TP 2 (loss parallel on and off) against the same
    model unsharded: loss and every parameter's gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel
    from torchtitan.components.loss import cross_entropy_loss

    from torchtitan_ext.long_context.chunked_loss import (
        ChunkedCrossEntropy,
        defer_output_projection,
    )
    from torchtitan_ext.long_context.tiled_mlp import apply_tiled_mlp
    from torchtitan_ext.parallel.tensor_parallel import apply_tp

    ref, args = _tiny_model()
    for p in ref.parameters():  # larger weights than init, so every path's gradient matters
        p.data.add_(torch.randn_like(p) * 0.05)
    tokens = torch.randint(0, args.vocab_size, (2, 33))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    ref_loss = cross_entropy_loss(ref(inputs), labels)
    ref_loss.backward()
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    for use_loss_parallel in (True, False):
        model = copy.deepcopy(ref)
        model.zero_grad()
        defer_output_projection(model)
        apply_tiled_mlp(model, tile_tokens=5)
        apply_tp(model, mesh, loss_parallel=use_loss_parallel, output_deferred=True)
        loss_fn = ChunkedCrossEntropy(model.output, 7, loss_parallel=use_loss_parallel)
        ctx = loss_parallel() if use_loss_parallel else torch.enable_grad()
        with ctx:
            loss = loss_fn(model(inputs), labels)
            loss.backward()
        local = loss.to_local() if isinstance(loss, DTensor) else loss
        assert _rel(local.detach(), ref_loss.detach()) < 1e-6, (use_loss_parallel, local)
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            want = ref_params[name].grad
            assert want is not None
            assert _rel(grad, want) < 1e-5, (use_loss_parallel, name, _rel(grad, want))


def test_features_under_tensor_parallel_match_every_gradient():
    spawn(_tp_features_match, 2)


def test_cuda_allocator_gets_expandable_segments_unless_set():
    env: dict[str, str] = {}
    assert configure_cuda_allocator(env) == CUDA_ALLOC_CONF == "expandable_segments:True"
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}
    assert configure_cuda_allocator(mine) == "max_split_size_mb:512"


def test_activation_offload_moves_only_block_inputs_and_keeps_gradients(monkeypatch, tmp_path):
    """Full AC plus ``OffloadedBlock`` (pinned memory off: CPU): the tensors handed to
    ``save_on_cpu`` are each block's checkpoint inputs, never an intermediate, and the loss,
    every gradient and the state-dict keys equal full AC's without offload."""
    from torch.autograd.graph import save_on_cpu
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torchtitan.components.loss import cross_entropy_loss

    from torchtitan_ext.config import load_config
    from torchtitan_ext.parallel import activation_checkpoint as ac_module

    packed: list[tuple[int, ...]] = []
    WRAPPED = "_checkpoint_wrapped_module."

    class RecordingSaveOnCpu(save_on_cpu):
        def __init__(self, pin_memory: bool = False, device_type: str = "cuda") -> None:
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook

            def record(t: torch.Tensor) -> object:
                packed.append(tuple(t.shape))
                return pack(t)

            self.pack_hook = record

    monkeypatch.setattr(ac_module, "save_on_cpu", RecordingSaveOnCpu)
    base, args = _tiny_model()
    tokens = torch.randint(0, args.vocab_size, (2, 33))
    ac_cfg = load_config(["--activation_checkpoint.mode", "full"]).activation_checkpoint
    results = []
    for offload in (False, True):
        model = copy.deepcopy(base)
        ac_module.apply_ac(model, ac_cfg, compile_enabled=False, dump_folder=str(tmp_path))
        if offload:
            assert ac_module.apply_activation_offload(model, pin_memory=False) == args.n_layers
            # Checkpoints (DCP) see the unwrapped names, so they load with or without offload.
            assert get_model_state_dict(model).keys() == base.state_dict().keys()
        loss = cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:])
        if offload:
            # Exactly each block's two checkpoint inputs, in order: the hidden state (B, S, dim)
            # and the RoPE table rows of the sequence (S, head_dim / 2, complex); nothing else.
            block_inputs = [(2, 32, args.dim), (32, args.dim // args.n_heads // 2)]
            assert packed == block_inputs * args.n_layers, packed
        loss.backward()
        grads = {n.replace(WRAPPED, ""): p.grad for n, p in model.named_parameters()}
        results.append((loss.detach(), grads))
    (ref_loss, ref_grads), (loss, grads) = results
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None and torch.equal(grad, ref_grads[name]), name


def test_activation_offload_is_rejected_off_cuda_and_without_full_ac():
    from torchtitan_ext.config import ConfigError, load_config
    from torchtitan_ext.parallel.activation_checkpoint import check_activation_offload

    on = ["--activation_checkpoint.enable_cpu_offload"]
    full = load_config([*on, "--activation_checkpoint.mode", "full"])
    check_activation_offload(full, "cuda")
    with pytest.raises(ConfigError, match=r"activation_checkpoint\.enable_cpu_offload.*on cpu"):
        check_activation_offload(full, "cpu")
    selective = load_config([*on, "--activation_checkpoint.mode", "selective"])
    with pytest.raises(ConfigError, match=r'needs activation_checkpoint\.mode = "full"'):
        check_activation_offload(selective, "cuda")
    check_activation_offload(load_config([]), "cpu")  # off: nothing to check


def _step_memory_runs(rank: int, world_size: int, dump: str) -> None:
    """Two 1-rank runs of a small model with a large vocabulary (the logits dominate a step),
    1 step of 1 x 512 tokens: chunked loss off, then on (chunks of 64 tokens)."""
    import logging

    from torchtitan.models.llama3 import llama3_args
    from torchtitan.models.llama3.model.args import TransformerModelArgs

    from tests.conftest import tiny_run_args
    from torchtitan_ext.distributed import RankInfo
    from torchtitan_ext.trainer import Trainer, prepare

    # Logits of 512 tokens x 16384 = 32 MiB in fp32; the rest of the step is a few MiB.
    llama3_args["test_wide_vocab"] = TransformerModelArgs(
        dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16384, multiple_of=32
    )
    lines: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("torchtitan_ext")
    logger.addHandler(Lines())
    logger.setLevel(logging.INFO)
    step_mib = {}
    for chunk in (0, 64):
        args = [
            *tiny_run_args(Path(dump) / str(chunk), steps=1, seq_len=512, local_batch_size=1),
            *("--model.flavor", "test_wide_vocab", "--training.global_batch_size", "1"),
            *("--checkpoint.no-enable", "--metrics.no-enable-tensorboard"),
            *("--training.loss_chunk_tokens", str(chunk)),
        ]
        lines.clear()
        records = Trainer(prepare(args, RankInfo.from_env())).train()
        features = [line for line in lines if line.startswith("memory features: ")]
        loss = f"chunked loss {chunk} tokens" if chunk else "chunked loss off"
        assert features == [
            f"memory features: activation checkpointing none, {loss}, tiled MLP off, context "
            "parallel off, no FSDP, freed CPU memory returned at once (glibc mallopt)"
        ], lines
        (record,) = records
        assert type(record["step_mem_mib"]) is float, record
        step_mib[chunk] = record["step_mem_mib"]
    # Unchunked: the logits, their fp32 log-softmax and gradient (~3 x 32 MiB); chunked: one
    # 64-token chunk of each (4 MiB); both: the gradients and AdamW's state, created in this
    # first step (6 x 4 MiB). Measured: 107 and 37 MiB.
    assert step_mib[0] > 80, step_mib
    assert step_mib[64] < 0.5 * step_mib[0], step_mib


def test_step_memory_is_logged_and_falls_with_chunked_loss(tmp_path):
    """The step record's ``step_mem_mib`` (the figure docs/long_context.md's table reports) is
    in every record and falls when the chunked loss is on at the same shape; the start-up line
    names the memory features in use."""
    spawn(_step_memory_runs, 1, str(tmp_path))
