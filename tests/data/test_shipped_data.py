"""The shipped reward_data: the build scripts rewrite it byte for byte, and the valid split
(for choosing settings) shares no group with train or test."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from rlhf.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "reward_data"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"reward_data_{name}", DATA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_rewrites_the_shipped_files_byte_for_byte(tmp_path, monkeypatch, capsys):
    build = load_script("build")
    monkeypatch.setattr(build, "HERE", tmp_path)
    build.main()
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.jsonl"))
    assert [str(p) for p in written] == [
        f"{kind}/{split}.jsonl"
        for kind, splits in (
            ("prompts", ("test", "train", "valid")),
            ("rankings", ("test", "train")),
            ("sft", ("test", "train")),
        )
        for split in splits
    ]
    for path in written:
        assert (tmp_path / path).read_bytes() == (DATA / path).read_bytes(), path


def test_build_reviews_rewrites_the_shipped_files_byte_for_byte(tmp_path, monkeypatch, capsys):
    reviews = load_script("build_reviews")
    monkeypatch.setattr(reviews, "OUT", tmp_path)
    reviews.main()
    for split in ("train", "valid", "test"):
        shipped = (DATA / "reviews" / f"{split}.jsonl").read_bytes()
        assert (tmp_path / f"{split}.jsonl").read_bytes() == shipped, split


def test_split_groups_holds_out_whole_groups_for_valid_and_test():
    build = load_script("build")
    groups = [build.Group(f"g{i}", "c" if i < 20 else "d") for i in range(30)]
    sides = build.split_groups(build.random.Random(0), groups)
    keys = {side: [g.key for gs in sides[side].values() for g in gs] for side in sides}
    assert sorted(len(v) for v in keys.values()) == [3, 6, 21]  # 10% / 20% of 20 and of 10
    assert len(keys["valid"]) == 3 and len(keys["test"]) == 6
    assert sorted(keys["train"] + keys["valid"] + keys["test"]) == sorted(g.key for g in groups)


def test_valid_prompts_are_disjoint_from_train_and_test():
    for kind in ("prompts", "reviews"):
        valid = {row["prompt"] for row in read(DATA / kind / "valid.jsonl")}
        assert len(valid) == 60
        for split in ("train", "test"):
            assert not valid & {row["prompt"] for row in read(DATA / kind / f"{split}.jsonl")}
    valid_rows = read(DATA / "prompts" / "valid.jsonl")
    assert sum(row.get("category") == "harmful" for row in valid_rows) == 3
    assert sum("answer" in row for row in valid_rows) > 30


def test_review_subjects_do_not_cross_splits():
    reviews = load_script("build_reviews")
    subjects = {
        split: {reviews.subject_of(r) for r in read(DATA / "reviews" / f"{split}.jsonl")}
        for split in ("train", "valid", "test")
    }
    assert not subjects["train"] & subjects["valid"]
    assert not subjects["train"] & subjects["test"]
    assert not subjects["valid"] & subjects["test"]
    assert all(len(names) == 12 for names in (subjects["valid"], subjects["test"]))


@pytest.mark.parametrize(
    ("recipe", "valid"),
    [
        ("smollm2-135m.yaml", "reward_data/prompts/valid.jsonl"),
        ("tiny.yaml", "reward_data/prompts/valid.jsonl"),  # inherited
        ("smollm2-135m-sentiment.yaml", "reward_data/reviews/valid.jsonl"),
    ],
)
def test_recipes_name_the_valid_split(recipe, valid):
    loaded = load_recipe(ROOT / "recipes" / recipe)
    assert loaded.ppo.valid_prompts is not None and loaded.ppo.valid_prompts.path == valid
    assert loaded.ppo.eval_prompts.path != valid
