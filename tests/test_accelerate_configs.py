"""Launch configs (recipes/accelerate), the Makefile's launch line, and rlhf.infra.distributed.

What runs on this CPU machine: every YAML through accelerate's own config loader and launch
validation; the Makefile's LAUNCH for NPROC / ACCELERATE_CONFIG; every branch of the helpers
that decides what to do (sharding detection, per-rank shares, state-dict selection, frozen-role
loading, synced generation) and the no-op paths; a real DeepSpeed ZeRO-2 SFT run on 2 CPU ranks
(gloo) when deepspeed is installed. FSDP2 and ZeRO-3 run for real on 2 CPU ranks in
tests/test_sharded.py; the GPU configs' end-to-end test below runs only with 2 or more GPUs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType

from rlhf.infra import distributed

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None

# name -> (distributed_type, zero stage, optimizer offload, param offload)
EXPECTED = {
    "single": ("NO", None, None, None),
    "cpu-2proc": ("MULTI_GPU", None, None, None),
    "multi-gpu": ("MULTI_GPU", None, None, None),
    "multi-node": ("MULTI_GPU", None, None, None),
    "zero2": ("DEEPSPEED", 2, "none", "none"),
    "zero2-offload": ("DEEPSPEED", 2, "cpu", "none"),
    "zero3": ("DEEPSPEED", 3, "none", "none"),
    "zero3-offload": ("DEEPSPEED", 3, "cpu", "cpu"),
    "zero3-cpu": ("DEEPSPEED", 3, None, None),  # settings in zero3-cpu.json
    "fsdp": ("FSDP", None, None, None),
    "fsdp2": ("FSDP", None, None, None),
    "fsdp2-cpu": ("FSDP", None, None, None),
}


def _deepspeed_settings(ds: dict) -> dict:
    """The ZeRO settings of an accelerate deepspeed_config block, inline or in its JSON file."""
    if "deepspeed_config_file" not in ds:
        return ds
    config = json.loads((REPO / ds["deepspeed_config_file"]).read_text())
    zero = config["zero_optimization"]
    return {
        **ds,
        "zero_stage": zero["stage"],
        "zero3_save_16bit_model": zero.get("stage3_gather_16bit_weights_on_model_save", False),
        "gradient_accumulation_steps": config["gradient_accumulation_steps"],
        "stage3_param_persistence_threshold": zero.get("stage3_param_persistence_threshold"),
    }


def test_every_config_is_covered():
    assert {p.stem for p in CONFIGS} == set(EXPECTED)
    assert (REPO / "recipes" / "accelerate" / "README.md").is_file()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_in_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    raw = yaml.safe_load(path.read_text())
    cfg = load_config_from_file(str(path))  # rejects unknown keys and bad enum values
    kind, stage, opt_off, par_off = EXPECTED[path.stem]
    assert cfg.distributed_type == DistributedType[kind] == raw["distributed_type"]
    assert cfg.num_processes >= 1 and cfg.num_machines >= 1
    if kind == "DEEPSPEED":
        ds = _deepspeed_settings(cfg.deepspeed_config)
        assert ds["zero_stage"] == stage
        assert ds.get("offload_optimizer_device") == opt_off
        assert ds.get("offload_param_device") == par_off
        # the recipe's grad_accum must win: set here, it would override Accelerator's argument
        assert ds.get("gradient_accumulation_steps", "auto") == "auto"
        if path.stem == "zero3-cpu":  # partitions every parameter, however small (tests)
            assert ds["stage3_param_persistence_threshold"] == 0
        if stage == 3:
            assert ds["zero3_init_flag"] is True
            assert ds["zero3_save_16bit_model"] is True  # else get_state_dict refuses
    else:
        assert not cfg.deepspeed_config
    if kind == "FSDP":
        fsdp = cfg.fsdp_config
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        # FSDP2: checkpoints sharded per rank; the final model is gathered in full either way
        state_dict_type = "SHARDED" if path.stem.startswith("fsdp2") else "FULL"
        assert fsdp["fsdp_state_dict_type"] == f"{state_dict_type}_STATE_DICT"
        if path.stem.startswith("fsdp2"):
            assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
        else:
            assert fsdp["fsdp_sync_module_states"] is True
        # true would load PPO's frozen roles as empty tensors on ranks > 0
        assert fsdp["fsdp_cpu_ram_efficient_loading"] is False
    if path.stem == "multi-node":
        assert cfg.num_machines == 2 and cfg.main_process_ip and cfg.main_process_port
        assert cfg.num_processes % cfg.num_machines == 0
    if path.stem == "cpu-2proc" or path.stem.endswith("-cpu"):
        assert cfg.num_processes == 2
        assert cfg.use_cpu or kind == "DEEPSPEED"  # DeepSpeed picks its CPU accelerator itself


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_launcher_accepts_config(path):
    """`accelerate launch --config_file` validation and the environment it hands the ranks."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "rlhf.cli"])
    args, defaults, _ = _validate_launch_command(args)
    kind, stage, opt_off, par_off = EXPECTED[path.stem]
    assert args.use_deepspeed == (kind == "DEEPSPEED")
    assert args.use_fsdp == (kind == "FSDP")
    if kind == "DEEPSPEED":
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        if "ACCELERATE_DEEPSPEED_CONFIG_FILE" in env:  # the JSON's settings: checked above
            assert (REPO / env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).is_file()
            assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
            return
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
        assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == opt_off
        assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == par_off
        assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == str(stage == 3).lower()
        assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env
        if stage == 3:
            assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
    elif kind in ("FSDP", "MULTI_GPU"):
        env = prepare_multi_gpu_env(args)
        if kind == "FSDP":
            assert env["ACCELERATE_USE_FSDP"] == "true"
            assert env["FSDP_STATE_DICT_TYPE"].endswith("_STATE_DICT")
            assert env["FSDP_VERSION"] == ("2" if path.stem.startswith("fsdp2") else "1")
            assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
        assert env["ACCELERATE_MIXED_PRECISION"] == defaults.mixed_precision
        # what goes to torchrun: ranks per machine x machines = num_processes
        nnodes = int(getattr(args, "nnodes", 1))
        assert int(args.nproc_per_node) * nnodes == defaults.num_processes
        if path.stem == "multi-node":
            assert (nnodes, args.node_rank) == (2, 0)
            endpoint = (
                getattr(args, "rdzv_endpoint", None) or f"{args.master_addr}:{args.master_port}"
            )
            assert endpoint == "10.0.0.1:29500"


# ------------------------------------------------------------------------------- Makefile


def _make_n(*assignments: str) -> str:
    # -o setup -o models: take the prerequisites as done, so -n prints only the stage's line.
    out = subprocess.run(
        ["make", "-n", "-o", "setup", "-o", "models", "ppo", *assignments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stdout.splitlines() if " ppo " in x]
    assert len(lines) == 1, out.stdout
    return lines[0]


def test_make_one_process_runs_the_cli_directly():
    line = _make_n()
    assert line.startswith(".venv/bin/rlhf ppo recipes/smollm2-135m.yaml")
    assert "accelerate" not in line


def test_make_nproc_launches_that_many_ranks():
    line = _make_n("NPROC=8")
    assert (
        ".venv/bin/accelerate launch --multi_gpu --num_machines 1 --num_processes 8 "
        "-m rlhf.cli ppo recipes/smollm2-135m.yaml"
    ) in line


def test_make_accelerate_config_uses_that_file():
    line = _make_n("ACCELERATE_CONFIG=recipes/accelerate/zero3.yaml", "ARGS=ppo.kl_coef=0.1")
    assert (
        ".venv/bin/accelerate launch --config_file recipes/accelerate/zero3.yaml "
        "-m rlhf.cli ppo recipes/smollm2-135m.yaml ppo.kl_coef=0.1"
    ) in line
    assert "--num_processes" not in line  # the config decides


# ------------------------------------------------------------------- rlhf.infra.distributed helpers


def _fake(kind: str, rank: int = 0, world: int = 2, **plugin) -> SimpleNamespace:
    """An accelerator as far as rlhf.infra.distributed looks at it."""
    state = SimpleNamespace(
        distributed_type=DistributedType[kind],
        num_processes=world,
        deepspeed_plugin=SimpleNamespace(**plugin) if kind == "DEEPSPEED" else None,
        fsdp_plugin=SimpleNamespace(**plugin) if kind == "FSDP" else None,
    )
    return SimpleNamespace(state=state, process_index=rank, num_processes=world)


@pytest.mark.parametrize(
    ("acc", "expected"),
    [
        (_fake("NO", world=1), ""),
        (_fake("MULTI_CPU"), ""),
        (_fake("MULTI_GPU"), ""),
        (_fake("DEEPSPEED", zero_stage=1), ""),
        (_fake("DEEPSPEED", zero_stage=2), ""),
        (_fake("DEEPSPEED", zero_stage=3), "zero3"),
        (_fake("FSDP", fsdp_version=1), "fsdp1"),
        (_fake("FSDP", fsdp_version=2), "fsdp2"),
    ],
    ids=["single", "cpu-ddp", "ddp", "zero1", "zero2", "zero3", "fsdp1", "fsdp2"],
)
def test_sharding_detection(acc, expected):
    assert distributed.sharding(acc) == expected
    assert distributed.is_sharded(acc) == bool(expected)
    assert distributed.synced_gpus(acc) == bool(expected)  # world 2
    if expected:  # one rank of a sharded setup has nobody to wait for
        acc.state.num_processes = 1
        assert not distributed.synced_gpus(acc)


def test_rank_indices_disjoint_without_sharding_and_even_with_it():
    ddp = [distributed.rank_indices(5, _fake("MULTI_GPU", rank=r)) for r in (0, 1)]
    assert ddp == [[0, 2, 4], [1, 3]]
    z3 = [distributed.rank_indices(5, _fake("DEEPSPEED", rank=r, zero_stage=3)) for r in (0, 1)]
    assert z3 == [[0, 2, 4], [1, 3, 0]]  # same count on every rank; every item covered
    assert distributed.rank_indices(0, _fake("DEEPSPEED", zero_stage=3)) == []
    three = [distributed.rank_indices(7, _fake("FSDP", r, 3, fsdp_version=1)) for r in range(3)]
    assert {len(x) for x in three} == {3} and set(sum(three, [])) == set(range(7))


def test_full_state_dict_none_without_sharding_and_prefix_selected_with_it():
    assert distributed.full_state_dict(_fake("MULTI_GPU"), object()) is None
    acc = _fake("DEEPSPEED", zero_stage=3)
    module = torch.nn.Module()  # what unwrap_model returns: a policy with a tied weight
    module.policy = torch.nn.Module()
    module.policy.w = torch.nn.Parameter(torch.ones(1))
    module.policy.tied = module.policy.w  # as an LM head tied to the embeddings
    acc.unwrap_model = lambda model: module
    full = {"policy.w": torch.ones(1), "policy.b": torch.zeros(1), "value_head.w": torch.ones(1)}
    calls = []
    # FSDP2's gathered state lists a tied weight under both names: saved once, first name kept
    acc.get_state_dict = lambda model: calls.append(model) or {**full, "policy.tied": torch.ones(1)}
    assert distributed.full_state_dict(acc, "engine") == full
    assert set(distributed.full_state_dict(acc, "engine", prefix="policy.")) == {"w", "b"}
    assert calls == ["engine", "engine"]  # the prepared model, on every call (a collective)
    acc.get_state_dict = lambda model: None  # ZeRO-3 consolidates on rank 0 only
    assert distributed.full_state_dict(acc, "engine", prefix="policy.") is None


def test_unsharded_init_hides_zero3_from_transformers_and_fsdp_lazy_loading(monkeypatch):
    from transformers.integrations import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    class Registered:  # accelerate's HfDeepSpeedConfig, as far as transformers asks it
        def is_zero3(self) -> bool:
            return True

    registered = Registered()
    set_hf_deepspeed_config(registered)
    try:
        acc = _fake("DEEPSPEED", zero_stage=3, zero3_init_flag=True, dschf=registered)
        assert is_deepspeed_zero3_enabled()  # from_pretrained would partition at load
        with distributed.unsharded_init(acc):
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()  # restored for the trainable model
    finally:
        unset_hf_deepspeed_config()
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with distributed.unsharded_init(_fake("FSDP", fsdp_version=1)):
        assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"


def test_helpers_are_noops_on_a_real_cpu_accelerator():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = acc.prepare(torch.nn.Linear(2, 2))
    assert not distributed.is_sharded(acc) and not distributed.synced_gpus(acc)
    assert not distributed.synced_gpus()  # the global state seen by rollout.sample_rollout
    with distributed.gathered_for_generation(acc, model), distributed.unsharded_init(acc):
        out = acc.unwrap_model(model)(torch.ones(1, 2))
    assert out.shape == (1, 2)
    assert distributed.full_state_dict(acc, model) is None
    assert distributed.rank_indices(3, acc) == [0, 1, 2]


def test_generate_passes_synced_gpus_only_when_sharded(monkeypatch):
    from rlhf.ppo import rollout

    seen = {}

    class Policy(torch.nn.Module):  # a model without parameters: generate only
        def generate(self, input_ids, attention_mask, **kwargs):
            seen.update(kwargs)
            return torch.cat([input_ids, torch.full_like(input_ids[:, :1], 2)], dim=1)

    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0, decode=lambda ids, **_: "x")
    cfg = SimpleNamespace(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=4, stop_strings=None)
    ids = torch.ones(2, 3, dtype=torch.long)
    rollout.sample_rollout(Policy(), ids, torch.ones_like(ids), cfg, tok)
    assert "synced_gpus" not in seen
    monkeypatch.setattr(distributed, "synced_gpus", lambda accelerator=None: True)
    rollout.sample_rollout(Policy(), ids, torch.ones_like(ids), cfg, tok)
    assert seen["synced_gpus"] is True


def test_save_model_writes_the_gathered_state_dict(tmp_path, tiny_model_dir):
    """Rank 0's save under sharding: the module supplies config and class, the gathered
    state dict the weights (a ZeRO-3 module holds empty shards)."""
    from safetensors.torch import load_file

    from rlhf.roles import model_folder, models

    model = models.load_causal_lm(tiny_model_dir)
    tokenizer = models.load_tokenizer(tiny_model_dir)
    full = {k: v.clone() + 1.0 for k, v in model.state_dict().items()}
    model_folder.save_model(model, tokenizer, tmp_path, False, "card", state_dict=full)
    saved = {}
    for f in tmp_path.glob("*.safetensors"):
        saved.update(load_file(f))
    name = next(k for k in saved if k.endswith("embed_tokens.weight"))
    torch.testing.assert_close(saved[name], full[name])
    full[name][0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        model_folder.save_model(model, tokenizer, tmp_path / "bad", False, "card", state_dict=full)


# ----------------------------------------------------------------- real multi-process runs


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="deepspeed not installed: pip install -e '.[deepspeed]'"
)
def test_deepspeed_zero2_sft_on_two_cpu_ranks(tmp_path):
    """zero2.yaml as shipped, 2 CPU ranks over gloo (DeepSpeed's CPU accelerator).

    ~50 s on a 2-core machine; the first run also compiles DeepSpeed's shm_comm extension
    (3.5 min there under load)."""
    from tests.test_distributed import _free_port
    from tests.test_pipeline import _overrides, _write_data

    run = tmp_path / "run"
    args = _overrides(tmp_path, _write_data(tmp_path))
    args[0] = f"output_dir={run}"
    cmd = [
        ACCELERATE, "launch", "--config_file", "recipes/accelerate/zero2.yaml",
        "--num_processes", "2", "--mixed_precision", "no",
        "--main_process_port", str(_free_port()),
        "-m", "rlhf.cli", "sft", "recipes/tiny.yaml", *args, "sft.max_steps=2",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads((run / "sft" / "run.json").read_text())
    assert info["world_size"] == 2
    assert info["distributed_type"].endswith("DEEPSPEED")
    assert (run / "sft" / "COMPLETED").is_file()
    assert list((run / "sft" / "model").glob("*.safetensors"))


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="ZeRO-3 / FSDP shard parameters with NCCL all-gathers: needs 2+ CUDA GPUs "
    "(DeepSpeed ZeRO-3 and torch FSDP do not run this pipeline on CPU/gloo)",
)
@pytest.mark.parametrize("config", ["zero3", "fsdp"])
def test_sharded_pipeline_on_two_gpus(tmp_path, config):
    from tests.test_distributed import _free_port
    from tests.test_pipeline import _overrides, _write_data

    run = tmp_path / "run"
    args = _overrides(tmp_path, _write_data(tmp_path))
    args[0] = f"output_dir={run}"
    for stage in ("sft", "reward", "ppo"):
        cmd = [
            ACCELERATE, "launch", "--config_file", f"recipes/accelerate/{config}.yaml",
            "--num_processes", "2", "--main_process_port", str(_free_port()),
            "-m", "rlhf.cli", stage, "recipes/tiny.yaml", *args,
        ]  # fmt: skip
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        info = json.loads((run / stage / "run.json").read_text())
        assert info["world_size"] == 2
        assert list((run / stage / "model").glob("*.safetensors"))
