# NOTE: no `from __future__ import annotations` here: TorchTitan's ConfigManager merges
# these dataclasses into its JobConfig at run time and evaluates the annotations.
"""Our sections of the recipe, merged into TorchTitan 0.2.2's ``JobConfig``.

A recipe is one TOML file holding TorchTitan's sections and these; ``--section.key value``
overrides both. Fields that share a section name with TorchTitan (``model``, ``training``,
``parallelism``, ``comm``, ``checkpoint``) are merged field by field into TorchTitan's section by
``torchtitan.config.ConfigManager._merge_configs``; ``data`` is a section of our own.
Field docstrings are the ``--help`` text (tyro reads them).
"""

from dataclasses import dataclass, field
from typing import Any, Literal

MESH_DIM_NAMES: tuple[str, ...] = ("pp", "dp_replicate", "dp_shard", "tp", "cp")
"""Names of the DeviceMesh dims, in the default order (outermost first, cp innermost)."""


@dataclass
class Model:
    tokenizer: Literal["auto", "byte", "hf"] = "auto"
    """Tokenizer: "byte" (byte-level, 256 byte ids + BOS + EOS, needs no files), "hf" (the
    Hugging Face tokenizer.json under model.hf_assets_path) or "auto" (hf when that file
    exists, else byte)."""

    rope_theta: float = 0.0
    """RoPE base frequency (theta); 0 keeps the flavor's (Llama 3: 500000). Curriculum stages
    set their own."""

    rope_scaling: str = "llama"
    """RoPE context-extension scaling: "llama" (Llama 3.1's frequency scaling, what
    TorchTitan's Llama 3 always applies: factor 8, low/high frequency factors 1/4, original
    context 8192), "yarn" (YaRN, arXiv 2309.00071: NTK-by-parts interpolation and attention
    temperature) or "none" (theta only). Curriculum stages may set their own."""

    rope_scaling_factor: float = 8.0
    """Context extension factor of "llama" / "yarn" (>= 1)."""

    rope_original_context: int = 8192
    """Context (tokens) the unscaled frequencies were trained for ("llama" / "yarn")."""

    rope_low_freq_factor: float = 1.0
    """"llama": wavelengths above original_context / this are divided by the factor."""

    rope_high_freq_factor: float = 4.0
    """"llama": wavelengths below original_context / this are kept (> low_freq_factor)."""

    rope_yarn_beta_fast: float = 32.0
    """"yarn": dimensions turning more than this many times over the original context are
    kept (extrapolated)."""

    rope_yarn_beta_slow: float = 1.0
    """"yarn": dimensions turning fewer times than this are interpolated (< beta_fast)."""

    rope_yarn_attention_factor: float = 0.0
    """"yarn": scale of cos and sin (q.k scales by its square); 0: 0.1 ln(factor) + 1."""

    attn_mask_type: str = ""
    """Attention mask over the packed documents of a sequence: "causal" (every token sees
    every earlier token of the sequence) or "block_causal" (a token sees only the earlier
    tokens of its own document; documents end with the tokenizer's EOS, as TorchTitan's
    get_document_mask_mod). "" keeps the flavor's (TorchTitan sets it only per flavor; its SDPA
    flavors are causal). block_causal works with SDPA flavors under every
    context_parallel_pattern and load balancer, and without CP. Curriculum stages may set
    their own."""

    document_positions: bool = False
    """With block_causal: RoPE positions restart at 0 at each document start (default: they
    run over the whole packed sequence, as in TorchTitan)."""


@dataclass
class Training:
    dataset: str = "python_stdlib"
    """Dataset name. "python_stdlib": the source files of the running interpreter's standard
    library (ships with every Python, needs no download). Any other name needs
    training.dataset_path: a local .jsonl/.json/.parquet/.txt file or a folder of them
    (tokenized at start-up), or a prepared corpus folder (python -m
    torchtitan_ext.data.prepare; memory-mapped, for corpora of any size)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device type: "auto" picks cuda when a GPU is visible, else cpu."""

    max_consecutive_nonfinite_steps: int = 3
    """Non-finite guard. A step whose global gradient norm is inf or NaN (a non-finite loss
    makes it so) is skipped: no optimizer update, the LR schedule and the data still advance.
    Up to this many skipped steps in a row are tolerated; one more stops the run with an
    error naming the steps (0: the first stops it). No checkpoint is written at a skipped
    step (except the last step's) or from non-finite weights."""

    loss_chunk_tokens: int = 0
    """Chunked cross-entropy: the output projection and the loss run over this many tokens
    at a time (of the local batch x sequence), each chunk's gradients computed while its
    logits exist and the logits freed before the next chunk, so a step holds chunk x vocab
    logits instead of tokens x vocab. 0: off.
    At most the local sequence (seq_len / cp)."""

    mlp_tile_tokens: int = 0
    """Tiled MLP: every block's feed-forward runs over tiles of this many tokens of the
    sequence, each recomputed in backward, so its (tokens x ffn_dim) intermediates exist one
    tile at a time. 0: off. At most the local sequence (seq_len / cp)."""


@dataclass
class ActivationCheckpoint:
    enable_cpu_offload: bool = False
    """Activation offload (CUDA only; needs mode = "full"): the checkpointed block inputs, the
    tensors full AC keeps per block (tokens x dim each), live in pinned host memory from the
    block's forward until its recompute in backward, which copies them back (torch's
    save_on_cpu). Frees layers x tokens x dim of device memory for one host-to-device copy per
    block in backward. Not training.enable_cpu_offload, which offloads FSDP's parameters."""


@dataclass
class Parallelism:
    mesh_dim_order: list[str] | Literal["auto"] = field(
        default_factory=lambda: list(MESH_DIM_NAMES)
    )
    """Order of the DeviceMesh dims, outermost first. A permutation of pp, dp_replicate,
    dp_shard, tp, cp with pp first and dp_replicate second; the default puts cp innermost
    so that CP ring neighbours are adjacent ranks (TorchTitan 0.2.2 puts tp innermost:
    pp,dp_replicate,dp_shard,cp,tp). "auto" picks cp innermost where this torch can train
    it with the given degrees, else tp innermost, and logs which on rank 0."""

    context_parallel_pattern: str = "ring"
    """How attention is computed over the cp ranks (cp = inner x outer, inner = adjacent
    ranks): "ring" (torch's ring attention: K/V blocks rotate over all cp ranks);
    "ulysses" (DeepSpeed-Ulysses: all-to-all from sequence to heads, local attention over the
    whole sequence, all-to-all back; heads / tp must be divisible by cp); "hybrid" (USP:
    Ulysses over context_parallel_ulysses_degree inner ranks, a ring over the rest);
    "double_ring" (LoongTrain: a ring over context_parallel_inner_ring_degree inner ranks
    nested in a ring over the groups). Settable per curriculum stage."""

    context_parallel_load_balancer: str | None = "headtail"
    """How a sequence's tokens are dealt to the cp ranks: "headtail" (torch's head-tail: rank
    c holds chunks c and 2cp-1-c of 2cp, which balances a causal mask); None (contiguous
    slices; "None" on the command line). With model.attn_mask_type = "block_causal" also:
    "per_document_lpt" (short documents whole on one rank, long ones head-tail over as few
    ranks as their work needs, the work evened by LPT: the fastest with short documents),
    "per_document_headtail" (torch's: head-tail inside every document) and "ptrr" (torch's
    processing-time round-robin over blocks weighted by the mask's work). seq_len must be a
    multiple of 2 x cp x tp with a balancer."""

    context_parallel_ulysses_degree: int = 0
    """With context_parallel_pattern = "hybrid": ranks per all-to-all (2 .. cp / 2, dividing
    cp and heads / tp); the ring spans cp / this. 0 with any other pattern."""

    context_parallel_inner_ring_degree: int = 0
    """With context_parallel_pattern = "double_ring": ranks of the inner ring (2 .. cp / 2,
    dividing cp); the outer ring spans cp / this groups. 0 (the default): the largest divisor
    of cp in 2 .. min(cp / 2, 8), so an inner ring stays within an 8-GPU node (cp 4 -> 2,
    8 -> 4, 16 -> 8). 0 with any other pattern."""


@dataclass
class Comm:
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend: "auto" is nccl on cuda and gloo on cpu."""


@dataclass
class Checkpoint:
    stop_grace_seconds: float = 25.0
    """On SIGTERM (what Slurm and Kubernetes send before killing a job) or SIGINT (Ctrl-C),
    every rank finishes the current step, the step's checkpoint is written synchronously and
    the job exits with status 75 and one line, all within this many seconds of the signal;
    past them each process exits at once with status 1 and a line naming the newest complete
    checkpoint. Keep it below the SIGKILL deadline (torchrun --shutdown-timeout, default 30;
    Slurm KillWait or --signal; Kubernetes terminationGracePeriodSeconds). 0: off (a signal
    ends the process at once, as without this handling)."""

    verify: bool = True
    """Write a manifest (size and xxh3-64 checksum of every file) with each checkpoint and
    check it before loading; a checkpoint that fails the check or fails to load is reported
    and the previous complete one is loaded instead."""

    allow_unverified: bool = False
    """Load a checkpoint that has no manifest.json without checking it (one written elsewhere,
    or with verify = false). Off by default: every checkpoint this trainer writes with verify
    on has a manifest, so one without is damaged (its manifest deleted) and the previous
    complete checkpoint is loaded instead. A checkpoint that has a manifest is always checked.
    checkpoint.initial_load_path is loaded without a manifest either way."""


@dataclass
class Data:
    text_field: str = "text"
    """Column holding the document text in jsonl/json/parquet datasets."""

    validation_fraction: float = 0.02
    """Fraction of documents held out as the validation split (the last documents after the
    seeded shuffle; of a prepared corpus, its last documents in prepared order)."""

    verify_corpus: bool = False
    """With a prepared corpus (training.dataset_path = a folder from python -m
    torchtitan_ext.data.prepare): hash every shard at start-up and compare with the manifest
    (reads the whole corpus on every rank). Off: only the cheap checks (manifest, tokenizer,
    each file's size)."""

    shuffle_seed: int = 0
    """Seed of the document shuffle and of the per-epoch window order. Independent of the
    mesh, so every mesh shape sees the same global batch at every step."""


@dataclass
class Curriculum:
    stages: list[dict[str, Any]] = field(default_factory=list)
    """Context-length stages, in order ([[curriculum.stages]] tables; each needs seq_len and
    steps). Every key a stage may set (curriculum.STAGE_KEYS) is listed under
    [[curriculum.stages]] at the end of --help. Empty: no curriculum (the recipe trains
    training.steps at training.seq_len). With stages, training.steps is their sum and one LR
    schedule spans them."""

    tokens_per_step: int = 0
    """Tokens per optimizer step held constant across stages: each stage's global batch is
    tokens_per_step / seq_len sequences. 0: each stage's global_batch_size, else the
    training section's."""

    switch_in_memory: bool = True
    """Each stage continues from the previous stage's state in memory. A stage that keeps the
    mesh (the same degrees and order, no PP) keeps the model, optimizer and their shards in
    place and rebuilds only what depends on the sequence (RoPE buffers, data loader windows,
    batch split, CP pattern, LR); one that changes the mesh builds its model and optimizer on
    the new mesh and takes the state over in memory (DCP's resharding without the disk: both
    stages' model and optimizer are alive meanwhile). False: every stage reloads the boundary
    checkpoint from disk, as a resumed run does."""

    boundary_checkpoint: bool = True
    """Write a checkpoint at the last step of every stage (a crash in the next stage resumes
    from it). False, with switch_in_memory: only the checkpoint.interval checkpoints are
    written, so a crash early in a stage resumes from the previous stage's last interval
    checkpoint and retrains up to its boundary."""

    max_tokens_per_cp_rank: int = 0
    """If > 0, a stage without context_parallel_degree gets the smallest CP degree that keeps
    seq_len / cp <= this (and divides the world as the other degrees allow)."""

    auto_mesh: bool = False
    """Every stage gets its mesh from the planner (a stage can ask for it alone with
    ``auto_mesh = true`` in its table): among the tp x cp x CP-pattern choices that pass the
    recipe's validation (pp and dp_replicate stay the recipe's, dp_shard takes the rest), those
    whose dry-run memory per device fits auto_mesh_memory_gib, the least estimated time per
    token (compute at auto_mesh_tflops plus the dry run's bytes per step over the links below,
    over the tokens per step). Every choice trains the stage's batch: with global_batch_size =
    -1 and no tokens_per_step, local_batch_size x dp on the recipe's own tp and cp degrees. The
    plan is printed before training; a stage that sets context_parallel_degree or a pattern
    cannot also be auto-meshed."""

    auto_mesh_patterns: list[str] = field(
        default_factory=lambda: ["ring", "ulysses", "hybrid", "double_ring"]
    )
    """The CP patterns auto_mesh considers (each with every inner degree it can take)."""

    auto_mesh_memory_gib: float = 0.0
    """Memory budget per device for auto_mesh, GiB, that the dry run's estimate must stay
    within. 0: the CUDA device's memory less 2 GiB (CUDA context, NCCL buffers) and 10% of the
    rest (fragmentation), 70.2 of 80 GiB (on CPU, no limit)."""

    auto_mesh_ranks_per_node: int = 8
    """Consecutive ranks per node, for auto_mesh's intra / inter-node split."""

    auto_mesh_intra_node_gbps: float = 450.0
    """Bandwidth per rank within a node, GB/s (NVLink 4 on H100), for auto_mesh's estimate."""

    auto_mesh_inter_node_gbps: float = 50.0
    """Bandwidth per rank across nodes, GB/s (400 Gb/s InfiniBand), for auto_mesh's estimate."""

    auto_mesh_collective_latency_us: float = 20.0
    """Time per collective call beyond its bytes, microseconds (small-message NCCL latency
    within a node), for auto_mesh's estimate: TP issues many small collectives per block. On
    CPU/gloo it is far larger; scripts/bench_auto_mesh.py measures it."""

    auto_mesh_tflops: float = 400.0
    """Sustained TFLOPS per device for the compute part of auto_mesh's step-time estimate
    (about 40% MFU of an H100's dense bf16 peak); the same for every choice of a stage, so it
    changes the printed step time, not the choice."""


@dataclass
class JobConfig:
    """torchtitan_ext's additions to TorchTitan 0.2.2's JobConfig."""

    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    parallelism: Parallelism = field(default_factory=Parallelism)
    comm: Comm = field(default_factory=Comm)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    data: Data = field(default_factory=Data)
    curriculum: Curriculum = field(default_factory=Curriculum)
