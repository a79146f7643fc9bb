"""Shared fixtures. Tests run offline on the tiny random model and the truncated SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """Recipes use paths relative to the repo root, as the Makefile runs them."""
    monkeypatch.chdir(REPO)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real human data not found at {SHARED_DATA} (../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    from rlhf import models

    return models.resolve("tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from rlhf import models

    return models.resolve("smollm2-135m-instruct")
