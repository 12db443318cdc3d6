"""Hugging Face checkpoints in and out (``checkpoint.initial_load_in_hf``,
``checkpoint.last_save_in_hf``; ``torchtitan_ext.checkpoint.hf``) against ``transformers``
itself: a tiny random Llama made and saved by ``transformers`` in the debug flavor's shape
(``debugmodel_cpu_tiny``, byte vocabulary) loads into our model with the same logits and
step-1 loss, on 1 rank and on a 4-rank FSDP x TP mesh; the export of a run whose optimizer
changed nothing (LR 1e-30: Adam's update, about 1e-30 per element, is below fp32 resolution)
gives back the same tensors bit for bit, and ``transformers`` loads it with the same loss. A
config.json of another shape is one ``ConfigError`` line naming both values.

The 8-rank 4D mesh (pp x dp_shard x tp x cp) is ``scripts/check_hf_checkpoint.py``.
"""

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ROOT, read_metrics, tiny_run_args, torchrun, train_single_many

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

SEQ_LEN = 32
TINY = "debugmodel_cpu_tiny"
TOL = 1e-5  # relative, fp32


def hf_llama_config(**overrides: Any) -> Any:
    """transformers' LlamaConfig of ``debugmodel_cpu_tiny`` (dim 64, 2 layers, 4 heads, 2 kv
    heads, SwiGLU 192, vocab 320, theta 500000, Llama 3.1 RoPE scaling: TorchTitan's)."""
    kwargs: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=16384,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def save_hf_llama(folder: Path, **overrides: Any) -> Path:
    """A random transformers Llama saved with ``save_pretrained`` (config.json +
    model.safetensors, fp32); the norms' weights random too, so that a misplaced norm
    shows."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_llama_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory) -> Path:
    return save_hf_llama(tmp_path_factory.mktemp("hf_src"))


def hf_args(dump: Path, src: Path, global_batch: int, steps: int = 1) -> list[str]:
    return [
        *tiny_run_args(dump, steps, seq_len=SEQ_LEN, global_batch_size=global_batch),
        *("--optimizer.lr", "1e-30"),
        *("--checkpoint.initial_load_path", str(src)),
        "--checkpoint.initial_load_in_hf",
        "--checkpoint.last_save_in_hf",
    ]


def step1_batch(global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's step-1 global batch of the tiny recipe (inputs, labels), (G, SEQ_LEN)
    int64: the embedded corpus split and packed as ``tools.reference_loop`` does."""
    from torchtitan_ext.data import (
        ByteTokenizer,
        PackedWindows,
        python_stdlib_documents,
        split_documents,
        tokenize,
    )

    train_docs, _ = split_documents(python_stdlib_documents(), 0.02, 0)
    windows = PackedWindows(tokenize(train_docs, ByteTokenizer()), SEQ_LEN, 0)
    return windows.batch(0, global_batch)


def hf_loss(folder: Path, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """transformers' mean next-token cross-entropy of the model in ``folder`` (fp32)."""
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    return float(loss)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def assert_export_equals_source(export: Path, src: Path) -> None:
    """The exported safetensors hold the source's tensors bit for bit, and nothing else."""
    ours = safetensors_torch.load_file(export / "model-00001-of-00001.safetensors")
    theirs = safetensors_torch.load_file(src / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        assert torch.equal(ours[key], value), key


def test_hf_logits_equal_transformers(hf_src):
    """1 process, no mesh: ``load_hf`` (TorchTitan's adapter + DCP's HF reader) into
    TorchTitan's Llama in our flavor gives transformers' logits."""
    import copy

    from torchtitan.components.checkpoint import ModelWrapper
    from torchtitan.models.llama3 import Transformer

    from torchtitan_ext.checkpoint.hf import build_adapter, load_hf
    from torchtitan_ext.config import load_config
    from torchtitan_ext.models import CPU_FLAVORS

    args = copy.deepcopy(CPU_FLAVORS[TINY])
    args.max_seq_len = SEQ_LEN
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    cfg = load_config(["--model.flavor", TINY])
    with pytest.warns(UserWarning, match="single process"):  # DCP without a process group
        load_hf(ModelWrapper(model), build_adapter(cfg, args), str(hf_src))
    inputs, _ = step1_batch(2)
    ref = transformers.LlamaForCausalLM.from_pretrained(hf_src, dtype=torch.float32).eval()
    with torch.no_grad():
        ours, theirs = model(inputs), ref(inputs).logits
    assert ours.shape == theirs.shape == (2, SEQ_LEN, 320)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < TOL


def our_model(scaling: Any, seq_len: int) -> Any:
    """TorchTitan's Llama in the tiny flavor with ``scaling``'s RoPE (``torchtitan_ext.rope``),
    initialized on CPU (no mesh)."""
    import copy

    from torchtitan.models.llama3 import Transformer

    from torchtitan_ext.models import CPU_FLAVORS
    from torchtitan_ext.rope import apply_rope_scaling

    args = copy.deepcopy(CPU_FLAVORS[TINY])
    args.max_seq_len = seq_len
    with torch.device("meta"):
        model = Transformer(args)
    apply_rope_scaling(model, scaling)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    return model


@pytest.mark.parametrize(
    "kind",
    ["llama", "yarn", "none"],
)
def test_hf_export_config_keeps_rope(hf_src, tmp_path, kind):
    """The config.json of an export (``hf_config``) makes transformers compute our model's
    logits for each RoPE scaling (a short original context, so that the scaling acts within
    64 positions): the weights of ``hf_src`` under our RoPE and under the written config."""
    from torchtitan.components.checkpoint import ModelWrapper

    from torchtitan_ext.checkpoint.hf import build_adapter, hf_config, load_hf
    from torchtitan_ext.config import load_config
    from torchtitan_ext.rope import RopeScaling

    scaling = RopeScaling(kind=kind, factor=4.0, original_context=16)
    model = our_model(scaling, 64)
    cfg = load_config(["--model.flavor", TINY])
    with pytest.warns(UserWarning, match="single process"):
        load_hf(ModelWrapper(model), build_adapter(cfg, model.model_args), str(hf_src))
    config = hf_config(model.model_args, scaling, "float32", 64)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(hf_src / "model.safetensors")
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    inputs = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(inputs), ref(inputs).logits
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < TOL


def check_run(dump: Path, src: Path, global_batch: int) -> None:
    """A 1-step run from ``src``: step-1 loss equals transformers' on the same batch; the
    export equals the source and transformers loads it with the same loss; the manifest
    covers the export."""
    inputs, labels = step1_batch(global_batch)
    (record,) = read_metrics(dump)
    expected = hf_loss(src, inputs, labels)
    assert rel(record["loss"], expected) < TOL, (record["loss"], expected)
    export = dump / "checkpoint" / "step-1"
    assert_export_equals_source(export, src)
    assert not (export / "sharded").exists()  # DCP's intermediate shards are removed
    manifest = json.loads((export / "manifest.json").read_text())["files"]
    for name in ("config.json", "model-00001-of-00001.safetensors", ".metadata"):
        assert name in manifest, name
    assert rel(hf_loss(export, inputs, labels), record["loss"]) < TOL


@pytest.fixture(scope="module")
def single_runs(hf_src, tmp_path_factory) -> dict[str, Path]:
    """The module's 1-rank runs from ``hf_src`` in one process (``train_single_many``), by
    name with their dump folders: "one-rank" (background saves) and "curriculum"
    (``CURRICULUM``)."""
    tmp = tmp_path_factory.mktemp("hf_runs")
    dumps = {"one-rank": tmp / "one-rank", "curriculum": tmp / "curriculum"}
    recipe = tmp / "curriculum.toml"
    base = (ROOT / "train_configs" / "debug_cpu.toml").read_text()
    recipe.write_text(base + CURRICULUM)
    curriculum = hf_args(dumps["curriculum"], hf_src, global_batch=2)
    curriculum[curriculum.index("--job.config_file") + 1] = str(recipe)
    one_rank = hf_args(dumps["one-rank"], hf_src, global_batch=2)
    train_single_many([[*one_rank, "--checkpoint.async_mode", "async"], curriculum])
    return dumps


def test_hf_in_and_out_1rank(hf_src, single_runs):
    """1 rank, with background saves (the export is written before the state's save starts,
    and published with it)."""
    check_run(single_runs["one-rank"], hf_src, global_batch=2)


def test_hf_in_and_out_fsdp2_tp2(hf_src, tmp_path):
    """4 ranks, dp_shard 2 x tp 2 (FSDP's and TP's DTensor shards of every weight, the
    permuted q/k projections split over both): the same loss, the same export."""
    mesh = [
        *("--parallelism.data_parallel_shard_degree", "2"),
        *("--parallelism.tensor_parallel_degree", "2"),
    ]
    torchrun(4, [*hf_args(tmp_path, hf_src, global_batch=4), *mesh])
    check_run(tmp_path, hf_src, global_batch=4)


CURRICULUM = """
[[curriculum.stages]]
seq_len = 32
steps = 1
global_batch_size = 2

[[curriculum.stages]]
seq_len = 64
steps = 1
global_batch_size = 2
rope_theta = 1000000
"""


def test_hf_curriculum_starts_from_hf(hf_src, single_runs):
    """A 2-stage curriculum from the HF checkpoint: stage 0 loads it (its step-1 loss is
    transformers'), stage 1 continues in memory with another RoPE theta, and the export
    at the end is the same weights with stage 1's theta and length in config.json."""
    from torchtitan_ext.data import (
        ByteTokenizer,
        GlobalBatchLoader,
        PackedWindows,
        python_stdlib_documents,
        split_documents,
        tokenize,
    )

    tmp_path = single_runs["curriculum"]
    records = read_metrics(tmp_path)
    assert [(r["step"], r["stage"], r["seq_len"]) for r in records] == [(1, 0, 32), (2, 1, 64)]

    # Step 1's batch as the curriculum's loader draws it (units of the longest stage).
    train_docs, _ = split_documents(python_stdlib_documents(), 0.02, 0)
    tokens = tokenize(train_docs, ByteTokenizer())
    loader = GlobalBatchLoader(
        PackedWindows(tokens, 32, 0, unit_len=64),
        local_batch_size=2,
        dp_rank=0,
        dp_degree=1,
        grad_accum_steps=1,
        continue_at_new_seq_len=True,
    )
    ((inputs, labels),) = loader.next_step()
    assert rel(records[0]["loss"], hf_loss(hf_src, inputs, labels)) < TOL
    # Step 2's: stage 1's loader continues from stage 0's position (the in-memory switch).
    position = loader.state_dict()
    loader = GlobalBatchLoader(
        PackedWindows(tokens, 64, 0, unit_len=64),
        local_batch_size=2,
        dp_rank=0,
        dp_degree=1,
        grad_accum_steps=1,
        continue_at_new_seq_len=True,
    )
    loader.load_state_dict(position)
    ((inputs2, labels2),) = loader.next_step()

    export = tmp_path / "checkpoint" / "step-2"
    assert_export_equals_source(export, hf_src)
    config = json.loads((export / "config.json").read_text())
    assert config["rope_theta"] == 1e6 and config["max_position_embeddings"] == 65536
    assert config["rope_scaling"]["rope_type"] == "llama3"
    loaded = transformers.AutoConfig.from_pretrained(export)
    assert loaded.rope_parameters["rope_theta"] == 1e6
    # transformers, reading stage 1's RoPE from config.json, computes our step-2 loss.
    assert rel(records[1]["loss"], hf_loss(export, inputs2, labels2)) < TOL


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"hidden_size": 128}, "dim 64, but .*config.json has hidden_size 128"),
        ({"num_key_value_heads": 4}, "n_kv_heads 2, but .*config.json has num_key_value_heads 4"),
        ({"vocab_size": 256}, "vocab_size 320, but .*config.json has vocab_size 256"),
        ({"num_hidden_layers": 3}, "n_layers 2, but .*config.json has num_hidden_layers 3"),
        (
            {"tie_word_embeddings": True},
            "tied embeddings False, but .*config.json has tie_word_embeddings True",
        ),
        ({"rms_norm_eps": 1e-6}, "norm_eps 1e-05, but .*config.json has rms_norm_eps 1e-06"),
        (
            {"rope_theta": 10000.0},
            "rope_theta 500000, but .*config.json has rope_theta 10000: set model.rope_theta",
        ),
    ],
)
def test_hf_config_mismatch_is_one_line(tmp_path, override, message):
    """A config.json of another shape: one ConfigError naming model.flavor and both values,
    from the checks every rank runs before any collective (``check_recipe``)."""
    from torchtitan_ext.config import load_config
    from torchtitan_ext.errors import ConfigError
    from torchtitan_ext.validate import check_recipe

    config = hf_llama_config(**override).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")  # only config.json is read
    cfg = load_config(
        [
            *("--model.flavor", TINY, "--checkpoint.enable"),
            *("--checkpoint.initial_load_path", str(tmp_path), "--checkpoint.initial_load_in_hf"),
        ]
    )
    with pytest.raises(ConfigError) as err:
        check_recipe(cfg, world_size=1)
    assert err.value.key == "model.flavor"
    assert "\n" not in str(err.value)
    assert re.search(message, str(err.value)), str(err.value)


def test_hf_options_and_mismatch_line(hf_src, tmp_path):
    """The keys HF checkpoints need (checkpoints on, a model-only load, a folder with
    config.json, no quantized load), and the whole line of a mismatch."""
    from torchtitan_ext.config import load_config
    from torchtitan_ext.errors import ConfigError
    from torchtitan_ext.validate import check_recipe

    load = ["--checkpoint.initial_load_path", str(hf_src), "--checkpoint.initial_load_in_hf"]
    cases = [
        (["--checkpoint.no-enable", *load], "checkpoint.initial_load_in_hf"),
        (["--checkpoint.enable", *load, "--checkpoint.no-initial_load_model_only"],
         "checkpoint.initial_load_model_only"),
        (["--checkpoint.enable", "--checkpoint.initial_load_in_hf",
          "--checkpoint.initial_load_path", str(tmp_path)], "checkpoint.initial_load_path"),
        (["--checkpoint.enable", "--checkpoint.initial_load_in_hf_quantized"],
         "checkpoint.initial_load_in_hf_quantized"),
    ]  # fmt: skip
    for args, key in cases:
        with pytest.raises(ConfigError) as err:
            check_recipe(load_config(["--model.flavor", TINY, *args]), world_size=None)
        assert err.value.key == key, str(err.value)
    check_recipe(load_config(["--model.flavor", TINY, "--checkpoint.enable", *load]), None)

    bad = load_config(["--model.flavor", "debugmodel_cpu", "--checkpoint.enable", *load])
    with pytest.raises(ConfigError) as err:
        check_recipe(bad, world_size=None)
    assert str(err.value) == (
        f"model.flavor = 'debugmodel_cpu': dim 128, but {hf_src}/config.json has hidden_size "
        "64: the Hugging Face checkpoint is another model"
    )


def test_hf_rope_difference_is_named():
    """A recipe RoPE other than config.json's is one warning line naming both (TorchTitan's
    default Llama 3.1 scaling on a checkpoint without scaling); none when they agree."""
    from torchtitan_ext.checkpoint.hf import rope_difference
    from torchtitan_ext.models import CPU_FLAVORS
    from torchtitan_ext.rope import RopeScaling

    args = CPU_FLAVORS[TINY]
    config = hf_llama_config().to_dict()
    assert rope_difference(config, args, RopeScaling()) is None
    plain = hf_llama_config(rope_scaling=None).to_dict()
    note = rope_difference(plain, args, RopeScaling())
    assert note is not None and "\n" not in note
    assert "rope scaling None -> {'rope_type': 'llama3', 'factor': 8.0" in note, note
    assert rope_difference(plain, args, RopeScaling(kind="none")) is None
    other_theta = hf_llama_config(rope_theta=10000.0).to_dict()
    assert "rope_theta 10000 -> 500000" in str(rope_difference(other_theta, args, RopeScaling()))
