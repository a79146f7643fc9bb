"""FSDP2 and DeepSpeed ZeRO-3 for real on 2 CPU ranks (gloo), against one rank.

One launch per engine runs tests/dist_sharded.py (generation, an SFT step, a PPO update, the
gathered state dict, a frozen role); one plain process runs it with twice the batch. Every
launch asserts world_size 2 and that each rank held about half of the parameters: a launch
that silently fell back to full copies (DDP) fails here.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.test_distributed import ACCELERATE, _env, _free_port

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
    done = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=400, env=_env(), check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    return load_file(out), meta


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
def test_two_sharded_ranks_equal_one_rank_with_twice_the_batch(engine, one_rank, tmp_path):
    config, distributed_type = ENGINES[engine]
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
