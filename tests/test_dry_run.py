"""Dry run on torch's fake process group: per-rank parameter bytes of TorchTitan's 8B and 70B
recipes at 64 and 512 ranks equal the model's total divided as the mesh says."""

import pytest

from torchtitan_ext.config import load_config
from torchtitan_ext.dry_run import plan_rank


def total_params(cfg) -> int:
    import torch
    from torchtitan.protocols.train_spec import get_train_spec

    from torchtitan_ext.config.validate import resolve_model_args

    args = resolve_model_args(cfg)
    args.update_from_config(cfg)
    with torch.device("meta"):
        model = get_train_spec(cfg.model.name).model_cls(args)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("recipe", "world_size", "divisor"),
    [("llama3_8b.toml", 64, 64), ("llama3_70b.toml", 512, 512)],
)
def test_param_bytes_per_rank(titan_recipes, recipe, world_size, divisor):
    cfg = load_config(["--job.config_file", str(titan_recipes / recipe)])
    plan = plan_rank(cfg, world_size, rank=0)
    expected = total_params(cfg) * 4 / divisor  # fp32 shards over FSDP (x TP)
    assert plan.param_bytes == pytest.approx(expected, rel=0.01)
    assert plan.grad_bytes == plan.param_bytes
    assert plan.optim_bytes == 2 * plan.param_bytes  # AdamW: two fp32 moments
    assert plan.activation_bytes > 0
