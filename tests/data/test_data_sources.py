"""Hub data sources and their local copies: validated by form (no network), read from the data
root when a copy is there, loaded with datasets.load_dataset otherwise, and one line on where
to get the data when neither works."""

from __future__ import annotations

import pytest
from helpers_data import HH_FILE, OASST_FILE, write_hh_fixture, write_oasst_fixture
from pydantic import ValidationError

from rlhf.cli import main
from rlhf.data import load_comparisons, readers
from rlhf.infra.errors import UserError
from rlhf.recipe import DataSource, load_recipe
from rlhf.stages.reward import load_datasets
from tests.conftest import human_data_dir, real_data_file

HH_RECIPE = "recipes/smollm2-135m-hh.yaml"


def test_hub_sources_validate_by_form_without_network():
    source = DataSource(path="Anthropic/hh-rlhf", data_dir="harmless-base", local=HH_FILE)
    assert source.data_dir == "harmless-base"
    with pytest.raises(ValidationError, match="and not a hub dataset id"):
        DataSource(path="two words/x y")
    # Plain paths (rlhf data check, rlhf eval) get the same check, as one line.
    with pytest.raises(UserError, match=r"^some/where/file: no such local data file as 'some/"):
        load_comparisons("some/where/file")


def test_hh_recipe_reads_local_copies_from_the_data_root(tmp_path, monkeypatch):
    write_hh_fixture(tmp_path)
    write_oasst_fixture(tmp_path)
    monkeypatch.setenv("RLHF_DATA_ROOT", str(tmp_path))
    recipe = load_recipe(HH_RECIPE)
    assert recipe.reward.train.local == str(tmp_path / HH_FILE)
    assert recipe.reward.extra_eval[0].local == str(tmp_path / OASST_FILE)
    train, evals, extras = load_datasets(recipe)
    assert len(train) + len(evals) == 4 and len(evals) == 1  # 10% of 4 prompts, at least one
    # lang: en drops the German tree: 2 rankings from tree 1, named after the copy.
    assert list(extras) == ["oasst_en_trees"] and len(extras["oasst_en_trees"]) == 2


def test_data_root_key_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_DATA_ROOT", str(tmp_path / "elsewhere"))
    recipe = load_recipe(HH_RECIPE, [f"data.root={tmp_path}"])
    assert recipe.reward.train.local == str(tmp_path / HH_FILE)
    monkeypatch.delenv("RLHF_DATA_ROOT")
    assert load_recipe(HH_RECIPE).reward.train.local == HH_FILE  # no root: left as written


def test_dpo_sources_read_local_copies_from_the_data_root_too(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_DATA_ROOT", str(tmp_path))
    hub = "Anthropic/hh-rlhf"
    recipe = load_recipe(
        HH_RECIPE,
        [
            f"dpo.train={{path: {hub}, local: {HH_FILE}}}",
            f"dpo.eval={{path: {hub}, local: {HH_FILE}}}",
        ],
    )
    assert recipe.dpo.train.local == recipe.dpo.eval.local == str(tmp_path / HH_FILE)
    assert recipe.dpo.train._key == "dpo.train"


def test_hub_source_is_loaded_with_its_data_dir(monkeypatch):
    import datasets

    monkeypatch.delenv("RLHF_DATA_ROOT", raising=False)
    rows = [
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: hello",
            "rejected": "\n\nHuman: hi\n\nAssistant: go",
        },
        {
            "chosen": "\n\nHuman: 2+2?\n\nAssistant: 4",
            "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5",
        },
        {
            "chosen": "\n\nHuman: bye\n\nAssistant: bye!",
            "rejected": "\n\nHuman: bye\n\nAssistant: .",
        },
    ]
    seen = {}

    def fake(path, data_dir=None, split="train"):
        seen.update(path=path, data_dir=data_dir, split=split)
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(readers, "hub_reachable", lambda: True)
    recipe = load_recipe(HH_RECIPE, ["reward.train.limit=2"])
    result = load_comparisons(recipe.reward.train)
    assert seen == {"path": "Anthropic/hh-rlhf", "data_dir": "harmless-base", "split": "test"}
    assert result.rows == 2 and [r.responses for r in result.items][1] == ["4", "5"]
    assert result.items[0].source == "Anthropic/hh-rlhf/harmless-base[test]:row 1"


def test_unreachable_hub_is_asked_in_offline_mode(monkeypatch):
    """An unreachable hub must not cost datasets' half a minute of retries: the load runs with
    the offline flags set (a warm datasets cache still answers), and they are restored."""
    import datasets
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert readers.hub_reachable(timeout=1.0) is False
    flags = []

    def fake(path, data_dir=None, split="train"):
        flags.append((datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE))
        raise ConnectionError("Couldn't reach the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    with pytest.raises(UserError, match=r"owner/name \(train split\): hub unreachable \(offline\)"):
        load_comparisons("owner/name")
    assert flags == [(True, True)]
    assert (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE) == (False, False)


def test_hh_recipe_without_copy_or_network_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RLHF_DATA_ROOT", raising=False)
    monkeypatch.setattr(readers, "hub_reachable", lambda: False)
    # fp32 like every in-process stage in the suite: accelerate's state outlives the call.
    rc = main(["reward", HH_RECIPE, f"output_dir={tmp_path}", "precision=fp32"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: reward.train: Anthropic/hh-rlhf (test split, data_dir harmless")
    assert "https://huggingface.co/datasets/Anthropic/hh-rlhf" in err
    assert f"RLHF_DATA_ROOT=<folder with {HH_FILE}> (or data.root=<folder>)" in err
    assert "reward.train.path=<file>" in err


def test_hh_recipe_on_the_real_files(monkeypatch):
    real_data_file(HH_FILE), real_data_file(OASST_FILE)
    monkeypatch.setenv("RLHF_DATA_ROOT", str(human_data_dir()))
    train, evals, extras = load_datasets(load_recipe(HH_RECIPE))
    assert len(train) + len(evals) == 1800
    assert sum(r.num_pairs for r in extras["oasst_en_trees"]) == 581  # every tree is English
