"""An independent training loop: TorchTitan's unmodified Llama 3 on one process, no mesh.

The trainer is checked against other meshes of itself by the parity matrix; a bug shared by
every mesh (loss scaling, gradient accumulation, clipping, the optimizer or LR schedule wiring,
the model wrappers) is invisible there. This loop is the other reference: plain PyTorch over
``torchtitan.models.llama3.Transformer`` as TorchTitan builds it (no parallelize, no AC, no
compile, no wrappers), with

* the trainer's initial weights (``models.init_weights_mesh_independent``, same seed),
* the trainer's training windows (the embedded corpus split and packed as the trainer's data
  path does, window ``k * G + i`` for step k, G sequences per step),
* summed cross-entropy over the step's label tokens divided by their count (TorchTitan's
  ``rescale_accumulated_loss`` arithmetic written out), ``clip_grad_norm_``, AdamW and
  TorchTitan's LR schedule builder, in the recipe's dtype on CPU.

Used by ``tests/test_reference_loop.py`` (losses and every step-1 gradient equal the trainer's)
and ``scripts/bench_overhead.py`` (the trainer's tokens/s against this loop's).
"""

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ReferenceResult:
    """One run of the reference loop.

    Attributes:
        losses: each step's loss (nats per label token), steps 1..N.
        step_ends: ``time.perf_counter()`` at the start of the loop, then at the end of each
            step (N + 1 values, seconds).
        tokens_per_step: input tokens of one optimizer step (global batch x seq_len).
        grads: the step-1 gradients as the optimizer applied them (after clipping), fp32 on
            CPU, by parameter name; empty unless requested.
        grad_norm: the step-1 total gradient norm before clipping (fp32 scalar tensor).
    """

    losses: list[float]
    step_ends: list[float]
    tokens_per_step: int
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_norm: torch.Tensor | None = None


def check_supported(cfg: Any) -> None:
    """Raise ValueError for a recipe whose work this loop does not reproduce.

    Raises:
        ValueError: a dataset other than the embedded one, another tokenizer or model, a
            device other than CPU.
    """
    t = cfg.training
    if t.dataset_path or t.dataset != "python_stdlib":
        raise ValueError("the reference loop trains on the embedded python_stdlib dataset only")
    if cfg.model.tokenizer == "hf":
        raise ValueError("the reference loop uses the byte-level tokenizer only")
    if cfg.model.name != "llama3":
        raise ValueError("the reference loop builds model.name = llama3 only")
    if t.device == "cuda":
        raise ValueError("the reference loop runs on CPU only")


def reference_loop(
    cfg: Any, steps: int, threads: int | None = None, record_step1_grads: bool = False
) -> ReferenceResult:
    """Train ``cfg``'s model for ``steps`` optimizer steps on one CPU process.

    Args:
        cfg: a loaded recipe (``torchtitan_ext.config.load_config``); its flavor, seq_len,
            local and global batch (-1: one local batch per step), dtype, optimizer, LR
            schedule, max_norm, seed and data keys are used.
        steps: optimizer steps (the LR schedule is built for ``steps``).
        threads: ``torch.set_num_threads`` (None: leave as is).
        record_step1_grads: keep the step-1 gradients (after clipping) in the result.

    Raises:
        ValueError: see ``check_supported``.
    """
    import torch.nn.functional as F
    from torchtitan.components.loss import IGNORE_INDEX
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.config import TORCH_DTYPE_MAP
    from torchtitan.models.llama3 import Transformer, llama3_args

    from torchtitan_ext.data import (
        ByteTokenizer,
        PackedWindows,
        python_stdlib_documents,
        split_documents,
        tokenize,
    )
    from torchtitan_ext.models import CPU_FLAVORS, init_weights_mesh_independent

    check_supported(cfg)
    if threads is not None:
        torch.set_num_threads(threads)
    t = cfg.training
    seed = 0 if cfg.debug.seed is None else int(cfg.debug.seed)
    local = int(t.local_batch_size)
    global_batch = local if t.global_batch_size == -1 else int(t.global_batch_size)
    accum = global_batch // local

    # Data: the trainer's training split and window order.
    train_docs, _ = split_documents(
        python_stdlib_documents(), cfg.data.validation_fraction, cfg.data.shuffle_seed
    )
    windows = PackedWindows(tokenize(train_docs, ByteTokenizer()), t.seq_len, cfg.data.shuffle_seed)

    # Model: TorchTitan's Transformer in training.dtype, the trainer's initial weights.
    torch.manual_seed(seed)
    flavors = {**llama3_args, **CPU_FLAVORS}
    model_args = copy.deepcopy(flavors[cfg.model.flavor])
    model_args.max_seq_len = t.seq_len  # what TransformerModelArgs.update_from_config does
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(TORCH_DTYPE_MAP[t.dtype])
    try:
        with torch.device("meta"):
            model = Transformer(model_args)
    finally:
        torch.set_default_dtype(default_dtype)
    init_weights_mesh_independent(model, seed, torch.device("cpu"))
    model.train()

    o = cfg.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer_cls = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}[o.name]
    optimizer = optimizer_cls(
        params,
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        weight_decay=o.weight_decay,
        foreach=o.implementation == "foreach",
        fused=o.implementation == "fused",
    )
    # TorchTitan's warmup/stable/decay schedule, as the trainer builds it (one LambdaLR per
    # optimizer; a plain list of optimizers is all it iterates).
    scheduler = build_lr_schedulers([optimizer], cfg.lr_scheduler, steps)

    losses: list[float] = []
    grads: dict[str, torch.Tensor] = {}
    grad_norm: torch.Tensor | None = None
    ends = [time.perf_counter()]
    consumed = 0
    for step in range(1, steps + 1):
        micro = [windows.batch(consumed + m * local, local) for m in range(accum)]
        consumed += global_batch
        optimizer.zero_grad()
        # The loss of the step is the sum over its label tokens divided by their count, so
        # microbatches of any size add up to the mean over the global batch.
        n_tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in micro)
        loss_sum = 0.0
        for inputs, labels in micro:
            pred = model(inputs)
            loss = (
                F.cross_entropy(
                    pred.flatten(0, 1).float(),
                    labels.flatten(0, 1),
                    reduction="sum",
                    ignore_index=IGNORE_INDEX,
                )
                / n_tokens
            )
            del pred
            loss.backward()
            loss_sum += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(params, t.max_norm, foreach=True)
        if step == 1 and record_step1_grads:
            grad_norm = norm.detach().float().clone()
            grads = {
                name: p.grad.detach().float().clone()
                for name, p in model.named_parameters()
                if p.grad is not None
            }
        optimizer.step()
        scheduler.step()
        losses.append(loss_sum)
        ends.append(time.perf_counter())
    return ReferenceResult(losses, ends, global_batch * t.seq_len, grads, grad_norm)
