"""The parallel degrees of a job and the one DeviceMesh built from them.

Follows TorchTitan's ``ParallelDims`` (``torchtitan/distributed/parallel_dims.py`` at v0.2.2):
one object validates the degrees once, builds the named meshes and answers ``*_enabled``; it is
passed around explicitly, nothing reads ``WORLD_SIZE`` ad hoc. Differences: the order of the mesh
dims is a recipe setting (``parallelism.mesh_dim_order``, cp innermost by default, where
TorchTitan fixes tp innermost; ``"auto"`` picks one for the degrees, ``auto_mesh_dim_order``),
and every error is a ``ConfigError`` raised before any collective.
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchtitan_ext.config.schema import MESH_DIM_NAMES
from torchtitan_ext.errors import ConfigError
from torchtitan_ext.parallel.fsdp import non_ascending_fsdp_tp_supported
from torchtitan_ext.rules import RecipeCheck, Rule

logger = logging.getLogger("torchtitan_ext")

MESH_DIM_ORDER_KEY = "parallelism.mesh_dim_order"

AUTO = "auto"
"""The ``parallelism.mesh_dim_order`` value (a string in TOML, ``["auto"]`` from the command
line) that lets ``auto_mesh_dim_order`` choose the order for the degrees."""

CP_INNERMOST: tuple[str, ...] = ("pp", "dp_replicate", "dp_shard", "tp", "cp")
"""The default order: CP ring neighbours are adjacent ranks."""

TP_INNERMOST: tuple[str, ...] = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
"""TorchTitan 0.2.2's order: TP peers are adjacent ranks."""

_FLAT_MESHES: dict[str, tuple[str, ...]] = {
    # FSDP shards over dp_shard x cp: CP ranks hold the same parameters and their gradients
    # must be reduced too (TorchTitan's "fsdp" mesh).
    "fsdp": ("dp_shard", "cp"),
    # The data-loading mesh: ranks in different batch groups read different samples.
    "batch": ("dp_replicate", "dp_shard"),
    # The data dims with cp, dp_replicate outermost: unflattened into the 2-D HSDP mesh.
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
    # The loss is summed over every rank that holds a different share of it: the dp x cp ranks
    # of the last pipeline stage (other stages contribute zeros).
    "loss": ("pp", "dp_replicate", "dp_shard", "cp"),
}


@dataclass
class ParallelDims:
    """Degrees of pp, dp_replicate, dp_shard, tp and cp, and the meshes built from them.

    Attributes:
        pp, dp_replicate, dp_shard, tp, cp: resolved degrees (``dp_shard = -1`` in a recipe is
            resolved to world_size / (pp * dp_replicate * tp * cp)).
        world_size: number of ranks; the product of the degrees.
        order: mesh dim names, outermost first.
        auto_order: ``order`` was chosen by ``auto_mesh_dim_order`` (``mesh_dim_order =
            "auto"``); ``build_mesh`` then logs it on rank 0.
    """

    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    cp: int
    world_size: int
    order: tuple[str, ...] = MESH_DIM_NAMES
    auto_order: bool = False
    _meshes: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, cfg: Any, world_size: int) -> "ParallelDims":
        """Resolve and validate the degrees of ``cfg.parallelism`` for ``world_size`` ranks.

        Raises:
            ConfigError: a degree < 1 (other than dp_shard = -1), a product that does not equal
                the world size, or an invalid ``mesh_dim_order`` (``"auto"`` is always valid).
        """
        degrees = check_degrees(cfg)
        others = degrees["pp"] * degrees["dp_replicate"] * degrees["tp"] * degrees["cp"]
        if degrees["dp_shard"] == -1:
            if world_size % others != 0:
                raise ConfigError(
                    f"parallelism.{DEGREE_KEYS['dp_shard']}",
                    -1,
                    f"world size {world_size} is not divisible by pp * dp_replicate * tp * cp "
                    f"= {others}",
                )
            degrees["dp_shard"] = world_size // others
        product = others * degrees["dp_shard"]
        if product != world_size:
            shape = " x ".join(f"{n} {degrees[n]}" for n in MESH_DIM_NAMES)
            raise ConfigError(
                "parallelism",
                shape,
                f"the degrees multiply to {product} but the world size is {world_size}: "
                + (
                    f"set data_parallel_shard_degree = -1 (it takes the {world_size // others} "
                    "ranks left), or launch "
                    if world_size % others == 0
                    else "change the degrees, or launch "
                )
                + f"{product} ranks (torchrun --nproc-per-node / --nnodes)",
            )
        given = mesh_dim_order_of(cfg.parallelism.mesh_dim_order)
        order = auto_mesh_dim_order(degrees) if given is None else given
        if not fsdp_tp_order_supported(order, degrees):
            raise ConfigError(
                MESH_DIM_ORDER_KEY,
                list(order),
                f"with tp > 1 and FSDP over dp_shard x cp, torch {torch.__version__} needs tp "
                f'after dp_shard and cp, e.g. {list(TP_INNERMOST)} (or "{AUTO}")',
            )
        return cls(
            pp=degrees["pp"],
            dp_replicate=degrees["dp_replicate"],
            dp_shard=degrees["dp_shard"],
            tp=degrees["tp"],
            cp=degrees["cp"],
            world_size=world_size,
            order=order,
            auto_order=given is None,
        )

    @property
    def dp(self) -> int:
        """Data-parallel degree: the number of groups that read different samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP is applied over dp_shard x cp whenever that product is > 1."""
        return self.dp_shard * self.cp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def loss_parallel_size(self) -> int:
        """Ranks over which the loss contributions are summed (pp x dp x cp)."""
        return self.pp * self.dp * self.cp

    @property
    def non_data_parallel_size(self) -> int:
        """Ranks that share each sample's compute: pp x tp x cp (TorchTitan's name)."""
        return self.pp * self.tp * self.cp

    def shape_str(self) -> str:
        """E.g. ``"pp 1 x dp_replicate 1 x dp_shard 4 x tp 1 x cp 1"`` in mesh order."""
        return " x ".join(f"{n} {getattr(self, n)}" for n in self.order)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Build the world DeviceMesh (dims in ``order``) and the flattened sub-meshes.

        Collective: every rank must call it, after ``init_process_group``.

        Named meshes afterwards available from ``get_mesh``: the five dims, ``fsdp``
        (dp_shard x cp), ``batch`` (dp_replicate x dp_shard), ``dp_cp`` (dp_replicate x
        dp_shard x cp), ``loss`` (pp x dp_replicate x dp_shard x cp) and ``hsdp`` (2-D:
        dp_replicate, dp_shard x cp).
        """
        shape = tuple(getattr(self, n) for n in self.order)
        world = init_device_mesh(device_type, shape, mesh_dim_names=self.order)
        meshes: dict[str, DeviceMesh] = {"world": world}
        for name in self.order:
            meshes[name] = world[name]
        for flat_name, dims in _FLAT_MESHES.items():
            in_order = tuple(d for d in self.order if d in dims)
            meshes[flat_name] = world[in_order]._flatten(flat_name)
        # dp_replicate is the outermost data dim (check_mesh_dim_order), so the dp_cp mesh's
        # rank layout is dp_replicate-major and unflattens into (dp_replicate, dp_shard x cp).
        meshes["hsdp"] = meshes["dp_cp"]._unflatten(
            0, (self.dp_replicate, self.dp_shard * self.cp), ("hsdp_replicate", "hsdp_shard")
        )
        self._meshes = meshes
        if self.auto_order and dist.get_rank() == 0:
            why = ""
            if self.order != CP_INNERMOST:
                why = f": torch {torch.__version__} cannot compose FSDP over cp with tp before it"
            inner = f"{self.order[-1]} innermost{why}"
            logger.info(f"mesh_dim_order {AUTO} -> {','.join(self.order)} ({inner})")
        return world

    def get_mesh(self, name: str) -> DeviceMesh:
        """A mesh built by ``build_mesh``: a dim name, ``fsdp``, ``batch``, ``dp_cp``,
        ``loss``, ``hsdp`` or ``world``.

        Raises:
            RuntimeError: ``build_mesh`` has not run.
            KeyError: unknown name.
        """
        if not self._meshes:
            raise RuntimeError("ParallelDims.build_mesh() must run before get_mesh()")
        return self._meshes[name]

    def dp_rank(self) -> int:
        """This rank's index in the batch mesh (which slice of the global batch it reads)."""
        return self.get_mesh("batch").get_local_rank()


DEGREE_KEYS: dict[str, str] = {
    "pp": "pipeline_parallel_degree",
    "dp_replicate": "data_parallel_replicate_degree",
    "dp_shard": "data_parallel_shard_degree",
    "tp": "tensor_parallel_degree",
    "cp": "context_parallel_degree",
}
"""Mesh dim name -> its degree's key in the ``parallelism`` section."""


def check_degrees(cfg: Any) -> dict[str, int]:
    """The degrees of ``cfg.parallelism`` by mesh dim name, each checked to be >= 1
    (``dp_shard`` may be -1: the rest of the world).

    Raises:
        ConfigError: naming the degree's key, e.g. ``parallelism.tensor_parallel_degree = 0``.
    """
    degrees = {name: int(getattr(cfg.parallelism, key)) for name, key in DEGREE_KEYS.items()}
    for name, d in degrees.items():
        if d < 1 and not (name == "dp_shard" and d == -1):
            allowed = ">= 1 or -1 (the rest of the world)" if name == "dp_shard" else ">= 1"
            raise ConfigError(f"parallelism.{DEGREE_KEYS[name]}", d, f"must be {allowed}")
    return degrees


def mesh_dim_order_of(value: object) -> tuple[str, ...] | None:
    """The recipe's ``parallelism.mesh_dim_order`` as a checked order, or None for ``"auto"``
    (the TOML string ``"auto"``, or ``["auto"]`` as the command line delivers it).

    Raises:
        ConfigError: naming ``parallelism.mesh_dim_order``: a string other than ``"auto"``,
            not a list of names, or a list that ``check_mesh_dim_order`` refuses.
    """
    if value == AUTO or (isinstance(value, (list, tuple)) and list(value) == [AUTO]):
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigError(
            MESH_DIM_ORDER_KEY,
            value,
            f'must be "{AUTO}" or a list: a permutation of {", ".join(MESH_DIM_NAMES)}',
        )
    order = tuple(str(v) for v in value)
    check_mesh_dim_order(order)
    return order


def fsdp_tp_order_supported(order: tuple[str, ...], degrees: Mapping[str, int]) -> bool:
    """Whether this torch trains ``order`` with these degrees: False only where tp > 1 comes
    before a dim of FSDP's dp_shard x cp mesh (of degree > 1) and
    ``non_ascending_fsdp_tp_supported()`` is False.

    FSDP2 composes its (dp_shard x cp) mesh with the tp mesh of TP's DTensors as one 2-D mesh;
    torch before ``DeviceMesh._concatenate`` builds it only from dims in ascending order
    (``torchtitan_ext.parallel.fsdp``).
    """
    fsdp_dims = [order.index(d) for d in ("dp_shard", "cp") if degrees[d] > 1]
    tp_before_fsdp = degrees["tp"] > 1 and bool(fsdp_dims) and order.index("tp") < max(fsdp_dims)
    return not tp_before_fsdp or non_ascending_fsdp_tp_supported()


def auto_mesh_dim_order(degrees: Mapping[str, int]) -> tuple[str, ...]:
    """The order ``mesh_dim_order = "auto"`` picks for ``degrees`` (resolved, by mesh dim
    name): ``CP_INNERMOST`` where ``fsdp_tp_order_supported`` (always on torch 2.13), else
    ``TP_INNERMOST``: tp > 1 and cp > 1 (FSDP spans cp) on a torch whose FSDP2 cannot compose
    a tp mesh dim that comes before an FSDP one. With cp = 1 cp innermost is kept: tp already
    comes after dp_shard, and both orders lay the ranks out alike."""
    if fsdp_tp_order_supported(CP_INNERMOST, degrees):
        return CP_INNERMOST
    return TP_INNERMOST


def check_mesh_dim_order(order: tuple[str, ...]) -> None:
    """Validate ``parallelism.mesh_dim_order``.

    Rules (for an explicit list; ``mesh_dim_order_of`` handles ``"auto"``): a permutation of
    pp, dp_replicate, dp_shard, tp, cp; pp outermost (stages span the slowest links, as in
    TorchTitan and Megatron-LM); dp_replicate next (HSDP replicas span nodes, and the HSDP mesh
    is built by unflattening the loss mesh, which needs it outermost among the data dims).
    dp_shard, tp and cp may come in any order (``fsdp_tp_order_supported`` adds a torch
    constraint that depends on the degrees).

    Raises:
        ConfigError: naming ``parallelism.mesh_dim_order`` and the given list.
    """
    key = MESH_DIM_ORDER_KEY
    if sorted(order) != sorted(MESH_DIM_NAMES):
        raise ConfigError(
            key, list(order), f'must be "{AUTO}" or a permutation of {", ".join(MESH_DIM_NAMES)}'
        )
    if order[0] != "pp" or order[1] != "dp_replicate":
        raise ConfigError(
            key,
            list(order),
            "pp must be first and dp_replicate second; dp_shard, tp and cp may be in any order",
        )


def seq_len_divisor(tp: int, cp: int, load_balancer: str | None) -> int:
    """What ``seq_len`` must be divisible by: tp for sequence parallel, and cp (2 x cp with a
    load balancer, which splits the sequence into 2 x cp chunks: TorchTitan's head-tail)."""
    cp_factor = 2 * cp if cp > 1 and load_balancer else cp
    return tp * cp_factor


def _degrees(c: RecipeCheck) -> None:
    check_degrees(c.cfg)


def _mesh_dim_order(c: RecipeCheck) -> None:
    mesh_dim_order_of(c.cfg.parallelism.mesh_dim_order)  # "auto" is resolved with the degrees


def _mesh(c: RecipeCheck) -> None:
    assert c.world_size is not None
    c.dims = ParallelDims.from_config(c.cfg, c.world_size)


RULES: tuple[Rule, ...] = (
    Rule(
        "recipe",
        ("parallelism.*_degree",),
        "degrees >= 1 (dp_shard: -1 fills the world)",
        _degrees,
        "parallel_dims",
    ),
    Rule(
        "recipe",
        ("parallelism.mesh_dim_order",),
        "a permutation of the mesh dims with cp innermost of the sequence dims, or 'auto'",
        _mesh_dim_order,
        "parallel_dims",
    ),
    Rule(
        "mesh",
        ("parallelism.*_degree",),
        "the degrees' product is the world size",
        _mesh,
        "parallel_dims",
    ),
)
"""This module's recipe rules (``torchtitan_ext.rules``); ``validate.RULES`` lists them in
its table, in phase order."""
