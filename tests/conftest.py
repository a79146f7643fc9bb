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


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    from rlhf.roles import models

    return models.resolve("tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from rlhf.roles import models

    return models.resolve("smollm2-135m-instruct")
