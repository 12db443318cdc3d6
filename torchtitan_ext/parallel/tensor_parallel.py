"""Tensor parallel (Megatron-LM style, arXiv 1909.08053) with sequence parallel (arXiv
2205.05198) for TorchTitan's Llama models, with ``torch.distributed.tensor.parallel`` plans.

The plan follows TorchTitan 0.2.2's ``apply_tp`` (``torchtitan/models/llama3/infra/
parallelize.py``): column-parallel q/k/v and w1/w3 (heads and FFN hidden units split over tp
ranks), row-parallel wo and w2 whose outputs are reduce-scattered back to sequence-sharded
activations, the norms in sequence-parallel form, the embedding row-parallel over the vocab, and
the output projection column-parallel over the vocab with loss parallel (cross-entropy computed
on vocab-sharded logits, ``loss_parallel()``) unless ``parallelism.disable_loss_parallel``.
"""

from collections.abc import Callable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def apply_tp(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    loss_parallel: bool,
    output_deferred: bool = False,
    float8_tensorwise: bool = False,
) -> None:
    """Shard ``model`` over ``tp_mesh`` in place.

    Activations between blocks are (B, S / tp, dim) sequence shards; inside attention and the
    feed-forward they are (B, S, dim / tp)-style head / hidden shards. With ``loss_parallel``
    the logits stay a DTensor sharded on the vocab dim (B, S, vocab / tp) for
    ``torch.distributed.tensor.parallel.loss_parallel``; else they are replicated plain tensors.
    With ``output_deferred`` (chunked cross-entropy: ``output`` returns its input), ``output``
    still shards its weight over the vocab and all-gathers its input over the sequence, and
    returns those (B, S, dim) hidden states as a replicated DTensor; the loss applies the
    weight (``ChunkedCrossEntropy``).

    Requires n_heads and n_kv_heads divisible by tp and seq_len by tp (checked by the config).
    A pipeline stage (embedding, norm or output set to None) gets the plan of what it holds.

    With ``float8_tensorwise`` (float8 converted blocks with tensorwise scaling:
    ``converters.float8_tensorwise_tp``) the blocks' linears and their inputs use torchao's
    ``Float8ColwiseParallel`` / ``Float8RowwiseParallel`` / ``PrepareFloat8ModuleInput``, which
    all-gather activations in float8, as TorchTitan 0.2.2's ``apply_tp`` does.
    """
    colwise: Callable[..., ParallelStyle] = ColwiseParallel
    rowwise: Callable[..., ParallelStyle] = RowwiseParallel
    prepare_input: Callable[..., ParallelStyle] = PrepareModuleInput
    if float8_tensorwise:
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
            PrepareFloat8ModuleInput,
        )

        colwise, rowwise = Float8ColwiseParallel, Float8RowwiseParallel
        prepare_input = PrepareFloat8ModuleInput
    outer_plan: dict[str, ParallelStyle] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel and not output_deferred else Replicate(),
            use_local_output=not (loss_parallel or output_deferred),
        ),
    }
    # A pipeline stage holds some of these modules (the others are None).
    present = {k: v for k, v in outer_plan.items() if getattr(model, k, None) is not None}
    if present:
        parallelize_module(model, tp_mesh, present)
    layers: nn.Module = model.get_submodule("layers")
    for block in layers.children():
        parallelize_module(
            block,
            tp_mesh,
            {
                "attention_norm": SequenceParallel(),
                # (x, freqs_cis, attention_masks, positions): only x is sharded.
                "attention": prepare_input(
                    input_layouts=(Shard(1), None, None, None),
                    desired_input_layouts=(Replicate(), None, None, None),
                ),
                "attention.wq": colwise(),
                "attention.wk": colwise(),
                "attention.wv": colwise(),
                "attention.wo": rowwise(output_layouts=Shard(1)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": prepare_input(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
                "feed_forward.w1": colwise(),
                "feed_forward.w2": rowwise(output_layouts=Shard(1)),
                "feed_forward.w3": colwise(),
            },
        )
