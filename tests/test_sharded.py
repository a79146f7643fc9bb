"""FSDP2 and DeepSpeed ZeRO-3 for real on 2 CPU ranks (gloo), against one rank.

One launch per engine runs tests/dist_sharded.py (generation, an SFT step, a PPO update, the
gathered state dict, a frozen role); one plain process runs it with twice the batch. Every
launch asserts world_size 2 and that each rank held about half of the parameters: a launch
that silently fell back to full copies (DDP) fails here. The slow end-to-end test runs every
stage through the CLI, DPO included; the loopback test starts FSDP2 from two
launchers (machine_rank 0 and 1).
"""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.test_distributed import (
    ACCELERATE,
    _env,
    _free_port,
    launch_error,
    launch_two_machines,
    run_launch,
)
from tests.test_pipeline import _overrides, _write_data

pytestmark = pytest.mark.multiprocess
REPO = Path(__file__).resolve().parents[1]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ENGINES = {
    "fsdp2": ("recipes/accelerate/fsdp2-cpu.yaml", "DistributedType.FSDP"),
    "zero3": ("recipes/accelerate/zero3-cpu.yaml", "DistributedType.DEEPSPEED"),
}


def _run_worker(out: Path, config: str | None) -> tuple[dict, dict]:
    if config is None:
        cmd = [sys.executable, "-m", "tests.dist_sharded", str(out)]
    else:
        cmd = [
            ACCELERATE, "launch", "--config_file", config, "--main_process_port",
            str(_free_port()), "-m", "tests.dist_sharded", str(out),
        ]  # fmt: skip
    done = run_launch(cmd, timeout=400, cwd=REPO, env=_env())
    assert done.returncode == 0, launch_error(done.stderr)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    return load_file(out), meta


@pytest.fixture(scope="module")
def deepspeed_ops() -> None:
    """DeepSpeed's CPU shared-memory op, built (or found built) once, before any timed launch.

    DeepSpeed compiles it on first use, inside the first ZeRO-3 launch: ~30 s on an idle 2-core
    machine, but more than that launch's whole timeout at low priority on a busy one (measured:
    still compiling after 600 s). A launch stopped mid-build also leaves the build's lock file
    behind, on which every later build waits. The cache (TORCH_EXTENSIONS_DIR) is rebuilt
    whenever another virtual environment's path built it last."""
    code = "from deepspeed.accelerator import get_accelerator as a; " + (
        "a().create_op_builder('ShareMemCommBuilder').load()"
    )
    done = run_launch([sys.executable, "-c", code], timeout=1800, cwd=REPO, env=_env())
    assert done.returncode == 0, launch_error(done.stderr)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return _run_worker(tmp_path_factory.mktemp("one") / "one.safetensors", None)[0]


@pytest.mark.parametrize(
    "engine",
    [
        "fsdp2",
        pytest.param(
            "zero3",
            marks=pytest.mark.skipif(
                not HAS_DEEPSPEED, reason="deepspeed not installed: pip install -e '.[deepspeed]'"
            ),
        ),
    ],
)
def test_two_sharded_ranks_equal_one_rank_with_twice_the_batch(engine, one_rank, tmp_path, request):
    config, distributed_type = ENGINES[engine]
    if engine == "zero3":
        request.getfixturevalue("deepspeed_ops")
    two, meta = _run_worker(tmp_path / f"{engine}.safetensors", config)
    assert one_rank["world_size"].item() == 1
    assert two["world_size"].item() == 2, "two ranks must really synchronise"
    assert meta == {"distributed_type": distributed_type, "sharding": engine}

    # Sharding happened: each rank held about half of the 22,721 elements (FSDP2 splits
    # every parameter on dim 0, ZeRO-3 pads each partition to a multiple of the world size).
    total = one_rank["total"].item()
    assert one_rank["held"].item() == total  # one rank: everything
    assert two["total"].tolist() == [total, total]
    held = two["held"].tolist()
    assert all(abs(h - total / 2) < 0.01 * total for h in held), held
    assert total <= sum(held) <= total + 2 * 23  # at most one padding element per parameter
    # The frozen role (loaded with unsharded_init) is a full copy on every rank.
    frozen = two["frozen_total"][0].item()
    assert frozen > 1e6 and two["frozen_held"].tolist() == [frozen, frozen]

    # Generation with gathered parameters gives rank r exactly the one-rank tokens of its rows.
    assert torch.equal(two["generated"], one_rank["generated"])

    # One SFT step and one PPO update: same losses and same weights at fp32 tolerance.
    assert two["sft_loss"].tolist() == pytest.approx([one_rank["sft_loss"].item()] * 2, rel=1e-6)
    assert two["ppo_loss"].tolist() == pytest.approx([one_rank["ppo_loss"].item()] * 2, rel=1e-5)
    weights = {k for k in one_rank if k.startswith("weights.")}
    assert weights == {k for k in two if k.startswith("weights.")} and len(weights) == 23
    for name in sorted(weights):
        torch.testing.assert_close(two[name], one_rank[name], rtol=1e-5, atol=1e-6, msg=name)
        initial = one_rank[name.replace("weights.", "initial.")]
        assert not torch.equal(two[name], initial), f"{name} did not move"


def _stage(config: str, stage: str, args: list[str]) -> str:
    cmd = [
        ACCELERATE, "launch", "--config_file", config, "--main_process_port", str(_free_port()),
        "-m", "rlhf.cli", stage, "recipes/tiny.yaml", *args,
    ]  # fmt: skip
    done = run_launch(cmd, timeout=600, cwd=REPO, env=_env())
    assert done.returncode == 0, launch_error(done.stderr)
    return done.stderr


def _dpo_one_rank(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "rlhf.cli", "dpo", "recipes/tiny.yaml", *args]
    done = run_launch(cmd, timeout=600, cwd=REPO, env=_env())
    assert done.returncode == 0, launch_error(done.stderr)


@pytest.mark.slow  # 6 launches + 1 process: 1497 s (ZeRO-3) on 2 cores busy with other jobs
@pytest.mark.parametrize(
    "engine",
    [
        "fsdp2",
        pytest.param("zero3", marks=pytest.mark.skipif(not HAS_DEEPSPEED, reason="no deepspeed")),
    ],
)
def test_every_stage_and_resume_under_sharding(engine, tmp_path, request):
    """`make sft reward ppo dpo RECIPE=recipes/tiny.yaml ACCELERATE_CONFIG=<engine>-cpu.yaml`,
    plus `--resume` from a sharded step-2 checkpoint ending with the same weights (SFT and DPO),
    and DPO ending with the weights of one rank with twice the batch."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config, distributed_type = ENGINES[engine]
    if engine == "zero3":
        request.getfixturevalue("deepspeed_ops")
    run = tmp_path / "run"
    paths = _write_data(tmp_path)
    args = _overrides(tmp_path, paths)
    args[0] = f"output_dir={run}"
    _stage(config, "sft", [*args, "sft.save_every=2"])
    checkpoint = run / "sft" / "checkpoints" / "step-000002"
    rank_1_shard = {
        "fsdp2": "pytorch_model_fsdp_0/__1_0.distcp",
        "zero3": "pytorch_model/zero_pp_rank_1_mp_rank_00_model_states.pt",
    }
    assert (checkpoint / rank_1_shard[engine]).is_file()  # rank 1 wrote its own shard
    first = load_file(run / "sft" / "model" / "model.safetensors")
    log = _stage(config, "sft", [*args, "sft.save_every=2", "--resume"])
    assert f"resumed from {checkpoint} (step 2)" in log
    resumed = load_file(run / "sft" / "model" / "model.safetensors")
    for name in first:
        torch.testing.assert_close(resumed[name], first[name], rtol=0, atol=0, msg=name)
    # full fine-tuning: the frozen reference is a full copy next to the sharded policy
    _stage(config, "reward", args)
    _stage(config, "ppo", [*args, "ppo.lora.enabled=false"])
    # DPO, full fine-tuning: 2 ranks x 2 rankings per step (the recipe's dpo.batch_size), 3
    # steps: within the first epoch of 15 rankings (accelerate pads a short last batch of an
    # epoch on 2 ranks with rankings from the start, which one rank does not see).
    dpo = [f"dpo.train.path={paths['rank']}", "dpo.eval=null", "dpo.lora.enabled=false"]
    dpo += ["dpo.max_steps=3"]
    _stage(config, "dpo", [*args, *dpo, "dpo.save_every=2"])
    checkpoint = run / "dpo" / "checkpoints" / "step-000002"
    assert (checkpoint / rank_1_shard[engine]).is_file()  # rank 1 wrote its own shard
    # --resume from the sharded step-2 checkpoint ends with the same weights; a step-3 one is
    # left torn (no VALID), as if the run had died while writing it.
    torn = shutil.copytree(checkpoint, checkpoint.with_name("step-000003"))
    (torn / "VALID").unlink()
    first = load_file(run / "dpo" / "model" / "model.safetensors")
    log = _stage(config, "dpo", [*args, *dpo, "dpo.save_every=2", "--resume"])
    assert f"resumed from {checkpoint} (step 2)" in log
    resumed = load_file(run / "dpo" / "model" / "model.safetensors")
    for name in first:
        torch.testing.assert_close(resumed[name], first[name], rtol=0, atol=0, msg=name)
    for stage in ("sft", "reward", "ppo", "dpo"):
        info = json.loads((run / stage / "run.json").read_text())
        assert info["world_size"] == 2 and info["distributed_type"] == distributed_type
        assert info["parameters"] > 3e6  # counted in full, not as ZeRO-3's empty placeholders
        assert (run / stage / "COMPLETED").is_file()
    # The policy is sharded: half per rank (the tiny model's 3,219,776 elements split
    # evenly), not a full copy; the frozen reference is a full copy on each rank, as PPO's.
    held = info["parameters_per_rank"]
    assert len(held) == 2 and all(abs(h - info["parameters"] / 2) < 1e3 for h in held), held
    assert info["reference_parameters_per_rank"] == [info["parameters"]] * 2
    # The end-of-run eval generated with sharded parameters on every rank (4 prompts x 4).
    evaluation = json.loads((run / "dpo" / "eval.json").read_text())
    assert evaluation["n_samples"] == 16 and evaluation["judges"]["reward"]["n"] == 16
    assert evaluation["preference"]["pairs"] > 0
    policy = AutoModelForCausalLM.from_pretrained(run / "ppo" / "model")
    scorer = AutoModelForSequenceClassification.from_pretrained(run / "reward" / "model")
    tuned = AutoModelForCausalLM.from_pretrained(run / "dpo" / "model")
    for model in (policy, scorer, tuned):
        assert all(torch.isfinite(p).all() and p.numel() for p in model.parameters())
    # The same 3 DPO steps on one rank with 4 rankings per step: the same weights, written once
    # each (a tied LM head is not saved a second time as the gathered state dict has it).
    one = tmp_path / "one"
    _dpo_one_rank([*args, *dpo, f"output_dir={one}", f"dpo.sft_dir={run / 'sft'}",
                   f"ppo.reward_dir={run / 'reward'}", "dpo.batch_size=4"])  # fmt: skip
    w1, w2 = (load_file(r / "dpo" / "model" / "model.safetensors") for r in (one, run))
    assert w1.keys() == w2.keys()
    start = load_file(run / "sft" / "model" / "model.safetensors")
    moved = max((w1[k] - start[k]).abs().max().item() for k in w1)
    gap = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    # Equal up to the fp32 reduction order through 3 AdamW steps; ranks that did not sync (or
    # trained on other rankings) differ by about `moved`.
    assert moved > 1e-4 and gap < 0.01 * moved, (moved, gap)


@pytest.mark.slow  # two launchers of a CLI stage: 117-616 s on 2 cores busy with other jobs
def test_two_machine_launch_on_localhost_under_fsdp2(tmp_path):
    """`fsdp2-cpu.yaml` started by two launchers, machine_rank 0 and 1, one rank each,
    rendezvous on 127.0.0.1 (multi-node FSDP2): one sharded group across the launchers."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    args = _overrides(tmp_path, _write_data(tmp_path))
    args[0] = f"output_dir={run}"
    sft = ["sft", "recipes/tiny.yaml", *args, "sft.max_steps=2", "sft.save_every=1"]
    launch_two_machines(["--config_file", ENGINES["fsdp2"][0]], sft, timeout=600)
    info = json.loads((run / "sft" / "run.json").read_text())
    assert info["world_size"] == 2 and info["local_world_size"] == 1  # one rank per "machine"
    assert info["distributed_type"] == "DistributedType.FSDP"
    # The rank of machine 1 wrote its own shard of the sharded checkpoint (step 1: the last
    # step saves the model, not a checkpoint).
    shard = run / "sft" / "checkpoints" / "step-000001" / "pytorch_model_fsdp_0" / "__1_0.distcp"
    assert shard.is_file() and (run / "sft" / "COMPLETED").is_file()
    model = AutoModelForCausalLM.from_pretrained(run / "sft" / "model")  # gathered, full
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]


def _tiny_gemma3(folder: Path) -> torch.Tensor:
    """A random 2-layer Gemma-3 with tied embeddings (64 tokens) saved to `folder`; returns its
    embedding table."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    sizes = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "head_dim": 16}
    heads = {"num_attention_heads": 2, "num_key_value_heads": 1, "sliding_window": 4}
    layers = {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]}
    config = Gemma3TextConfig(**sizes, **heads, **layers, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    return model.get_input_embeddings().weight.detach().clone()


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed")
def test_embedding_rows_copy_into_a_model_loaded_partitioned_under_zero3(tmp_path, deepspeed_ops):
    """sft.init_token_embeddings (recipes/gemma3-270m.yaml) under ZeRO-3: the model is loaded
    partitioned, each weight an empty placeholder, and the rows are still copied."""
    from tests.dist_embedding_copy import SOURCES

    table = _tiny_gemma3(tmp_path / "model")
    out = tmp_path / "out.safetensors"
    launch = [ACCELERATE, "launch", "--config_file", ENGINES["zero3"][0]]
    port = ["--main_process_port", str(_free_port())]
    worker = ["-m", "tests.dist_embedding_copy", str(tmp_path / "model"), str(out)]
    done = run_launch(launch + port + worker, timeout=400, cwd=REPO, env=_env())
    assert done.returncode == 0, launch_error(done.stderr)
    got = load_file(out)
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"sharding": "zero3"}
    assert got["world_size"].item() == 2 and got["held"].item() == 0  # a placeholder
    assert got["tied"].item()
    expected = table.clone()
    for dst, src in SOURCES.items():
        expected[dst] = table[src]
    assert torch.equal(got["embedding"], expected)
