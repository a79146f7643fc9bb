"""Shared fixtures. Tests run offline on the tiny random model and the truncated SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """Recipes use paths relative to the repo root, as the Makefile runs them."""
    monkeypatch.chdir(REPO)


def human_data_dir() -> Path:
    """Where the real human data files are: $RLHF_DATA_ROOT when set, else ../shared/data
    beside the repo (CI puts them there; a user's clone has neither)."""
    root = os.environ.get("RLHF_DATA_ROOT")
    return Path(root) if root else SHARED_DATA


def real_data_file(name: str) -> Path:
    """A real human data file, or a skip that names the missing file."""
    path = human_data_dir() / name
    if not path.is_file():
        pytest.skip(
            f"real data file {name} not found in {human_data_dir()} "
            "(../shared/data beside the repo, or RLHF_DATA_ROOT)"
        )
    return path


def device_under_test() -> torch.device:
    """Where device-aware tests run: $RLHF_TEST_DEVICE when set, else CUDA when present (the
    accelerate-based code picks it by itself there), else the CPU."""
    name = os.environ.get("RLHF_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return device_under_test()


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    from rlhf.roles import models

    return models.resolve("tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from rlhf.roles import models

    if os.environ.get("RLHF_TEST_WITHOUT_SMOLLM2") == "1":  # gpu/check.sh: not carried there
        pytest.skip("SmolLM2 is not available here (RLHF_TEST_WITHOUT_SMOLLM2=1)")

    return models.resolve("smollm2-135m-instruct")


@pytest.fixture()
def random_lora(tiny_model_dir):
    """A factory: the tiny model, in eval mode, with a LoRA adapter (r 4) whose B
    matrices are random. A fresh adapter is the identity (B = 0), which would hide whether the
    adapter is applied at all."""
    from rlhf.recipe import LoraConfig
    from rlhf.roles import models

    def make(std: float = 0.2, seed: int | None = None):
        policy = models.apply_lora(
            models.load_causal_lm(tiny_model_dir), LoraConfig(enabled=True, r=4)
        )
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, std, generator=generator)
        return policy.eval()

    return make


@pytest.fixture()
def matmul_attention_backwards(monkeypatch):
    """Counts the attention gradients computed through matmuls (rlhf/accel/attention.py)
    instead of torch's flash-attention backward: a list that grows by one per call."""
    from rlhf.accel import attention

    calls: list[int] = []
    gradients = attention.SdpaMatmulBackward._gradients

    def counted(ctx, d_out):
        calls.append(1)
        return gradients(ctx, d_out)

    monkeypatch.setattr(attention.SdpaMatmulBackward, "_gradients", staticmethod(counted))
    return calls


FORCED_OFF = "RLHF_ACCEL=off: the suite runs without the fast paths of rlhf/accel/"


def pytest_collection_modifyitems(config, items):
    """Under RLHF_ACCEL=off (`make test-plain`), skip the tests of a fast path itself (marked
    fast_path) and the `auto` runs of tests parametrized on accel_mode (they would run off
    while naming auto): the rest must pass on the plain path alone."""
    from rlhf import accel

    if not accel.forced_off():
        return
    for item in items:
        callspec = getattr(item, "callspec", None)
        auto = callspec is not None and callspec.params.get("accel_mode") == "auto"
        if auto or item.get_closest_marker("fast_path"):
            item.add_marker(pytest.mark.skip(reason=FORCED_OFF))


@pytest.fixture(params=["auto", "off"])
def accel_mode(request):
    """The test runs twice: with the fast paths of rlhf/accel/ (auto, on this CPU) and without
    (`auto` is skipped under RLHF_ACCEL=off)."""
    from rlhf import accel

    with accel.using(request.param):
        yield request.param
