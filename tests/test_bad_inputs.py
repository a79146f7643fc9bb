"""A table of user mistakes across recipes, data files, model folders and CLI arguments.

Each must give ONE line on stderr that names the thing (file, line, key) and what is wrong,
exit code 2, no traceback, and no output folder that looks complete (no COMPLETED marker).
"""

import json
from pathlib import Path

import pytest

from rlhf.cli import main

TINY = "recipes/tiny.yaml"


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _pairs(tmp: Path, *rows: dict) -> Path:
    return _jsonl(tmp / "pairs.jsonl", list(rows))


GOOD_PAIR = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}
GOOD_SFT = {
    "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
}


def _stage(stage: str, tmp: Path, *overrides: str) -> list[str]:
    return [stage, TINY, f"output_dir={tmp / 'run'}", *overrides]


def _fake_stage_dir(tmp: Path, stage: str, completed: bool) -> Path:
    d = tmp / "run" / stage
    (d / "model").mkdir(parents=True)
    if completed:
        (d / "COMPLETED").write_text("x")
    return d


# (id, argv builder (tmp_path, tiny_model_dir) -> argv, expected substrings in the one line)
CASES = [
    # --- recipes and overrides
    ("unknown-key", lambda t, m: _stage("sft", t, "sft.epochz=1"), ["sft.epochz", "unknown key"]),
    ("wrong-type", lambda t, m: _stage("ppo", t, "ppo.kl_coef=abc"), ["ppo.kl_coef", "number"]),
    (
        "negative-kl",
        lambda t, m: _stage("ppo", t, "ppo.kl_coef=-1"),
        ["ppo.kl_coef", "greater than or equal to 0"],
    ),
    ("lr-out-of-range", lambda t, m: _stage("sft", t, "sft.optim.lr=3"), ["sft.optim.lr"]),
    ("zero-temperature", lambda t, m: _stage("ppo", t, "ppo.temperature=0"), ["temperature"]),
    ("minibatch", lambda t, m: _stage("ppo", t, "ppo.mini_batch_size=3"), ["mini_batch_size"]),
    ("bad-precision", lambda t, m: _stage("sft", t, "precision=fp8"), ["precision"]),
    (
        "unknown-init-token",
        lambda t, m: _stage("sft", t, 'sft.init_token_embeddings={"<no_such_token>": "</s>"}'),
        ["sft.init_token_embeddings", "'<no_such_token>' is not one token"],
    ),
    ("override-no-equals", lambda t, m: _stage("sft", t, "sft.epochs"), ["key.path=value"]),
    ("missing-recipe", lambda t, m: ["sft", str(t / "nope.yaml")], ["nope.yaml", "not found"]),
    (
        "yaml-syntax",
        lambda t, m: ["sft", _write(t / "r.yaml", "sft:\n  epochs: [1\n")],
        ["r.yaml", "line"],
    ),
    ("yaml-not-mapping", lambda t, m: ["sft", _write(t / "r.yaml", "- a\n- b\n")], ["r.yaml"]),
    (
        "inherits-cycle",
        lambda t, m: ["sft", _write(t / "r.yaml", "inherits: r.yaml\n")],
        ["inheritance cycle"],
    ),
    ("unknown-stage-key", lambda t, m: _stage("sft", t, "ppo.value_model=big"), ["value_model"]),
    # --- data files
    ("missing-data", lambda t, m: _stage("sft", t, "sft.train.path=none.jsonl"), ["none.jsonl"]),
    (
        "malformed-json-line",
        lambda t, m: ["data", "check", str(_jsonl(t / "d.jsonl", [GOOD_PAIR, "{oops"]))],
        ["d.jsonl:2", "JSON"],
    ),
    (
        "missing-field",
        lambda t, m: [
            "data",
            "check",
            str(_pairs(t, {"prompt": "Hi?", "chosen": "Hello"})),
            "--format",
            "pairs",
        ],
        ["pairs.jsonl:1", "rejected"],
    ),
    (
        "empty-response",
        lambda t, m: ["data", "check", str(_pairs(t, {**GOOD_PAIR, "chosen": " "}))],
        ["pairs.jsonl:1", "empty"],
    ),
    (
        "chosen-equals-rejected",
        lambda t, m: ["data", "check", str(_pairs(t, {**GOOD_PAIR, "rejected": "Hello!"}))],
        ["pairs.jsonl:1", "identical"],
    ),
    (
        "duplicate-ranking-index",
        lambda t, m: [
            "data",
            "check",
            str(_pairs(t, {"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]})),
        ],
        ["pairs.jsonl:1", "ranking"],
    ),
    (
        "ranking-out-of-range",
        lambda t, m: [
            "data",
            "check",
            str(_pairs(t, {"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 5]})),
        ],
        ["pairs.jsonl:1", "ranking"],
    ),
    (
        "unreadable-gzip",
        lambda t, m: ["data", "check", _write(t / "d.jsonl.gz", "not gzip at all")],
        ["d.jsonl.gz"],
    ),
    ("empty-file", lambda t, m: ["data", "check", _write(t / "e.jsonl", "")], ["e.jsonl", "empty"]),
    (
        "empty-after-filtering",
        lambda t, m: _stage(
            "reward",
            t,
            f"reward.train.path={_pairs(t, {**GOOD_PAIR, 'rejected': 'Hello!'})}",
            "reward.eval=null",
            "data.on_invalid=skip",
            f"reward.init_from={m}",
        ),
        ["pairs.jsonl"],
    ),
    (
        "prompt-over-max-length",
        lambda t, m: _stage(
            "reward",
            t,
            f"reward.train.path={_pairs(t, {**GOOD_PAIR, 'prompt': 'word ' * 400})}",
            "reward.eval=null",
            "reward.max_length=64",
            f"reward.init_from={m}",
        ),
        ["pairs.jsonl:1", "max_length"],
    ),
    # --- model folders and stage outputs
    (
        "ppo-unfinished-sft",
        lambda t, m: (_fake_stage_dir(t, "sft", False), _stage("ppo", t))[1],
        ["sft", "COMPLETED"],
    ),
    (
        "ppo-missing-reward",
        lambda t, m: (_fake_stage_dir(t, "sft", True), _stage("ppo", t))[1],
        ["reward", "does not exist"],
    ),
    (
        "eval-missing-model",
        lambda t, m: ["eval", "reward", str(t / "nomodel"), str(_pairs(t, GOOD_PAIR))],
        ["nomodel"],
    ),
    (
        "pickle-only-weights",
        lambda t, m: ["generate", _pickle_only(t, m), "--prompt", "hi"],
        ["safetensors"],
    ),
    (
        "model-folder-empty-config-corrupt-weights",
        lambda t, m: _stage(
            "sft", t, f"model.name={_broken(t, m, 'empty')}", f"sft.train.path={_sft(t)}"
        ),
        ["broken-empty", "config.json"],
    ),
    (
        "model-folder-without-tokenizer",
        lambda t, m: _stage(
            "sft", t, f"model.name={_broken(t, m, 'notok')}", f"sft.train.path={_sft(t)}"
        ),
        ["broken-notok", "no tokenizer"],
    ),
    (
        "model-folder-truncated-safetensors",
        lambda t, m: _stage(
            "sft", t, f"model.name={_broken(t, m, 'cut')}", f"sft.train.path={_sft(t)}"
        ),
        ["broken-cut", "model.safetensors is truncated"],
    ),
    (
        "unknown-attn-implementation",
        lambda t, m: _stage(
            "sft", t, f"sft.train.path={_sft(t)}", "sft.eval=null", "model.attn_implementation=nope"
        ),
        ["attn_implementation", "nope"],
    ),
    (
        "unknown-model-name",
        lambda t, m: _stage("sft", t, "model.name=no-such-model", f"sft.train.path={_sft(t)}"),
        ["no-such-model"],
    ),
    (
        "unwritable-output",
        lambda t, m: [
            "sft",
            TINY,
            "output_dir=/proc/rlhf-cannot-write",
            f"sft.train.path={_sft(t)}",
            "sft.eval=null",
            f"sft.init_from={m}",
        ],
        ["/proc/rlhf-cannot-write"],
    ),
    (
        "viz-layer-out-of-range",
        lambda t, m: ["viz", "attention", str(m), "--text", "hello there", "--layer", "99"],
        ["layer"],
    ),
]


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _sft(tmp: Path) -> Path:
    return _jsonl(tmp / "sft.jsonl", [GOOD_SFT] * 4)


def _broken(tmp: Path, model_dir: Path, how: str) -> str:
    """A model folder that is not a valid model: `empty` config.json and garbage weights
    (nothing else), a copy `notok` without its tokenizer, or a copy whose weights are `cut`."""
    import shutil

    d = tmp / f"broken-{how}"
    if how == "empty":
        d.mkdir()
        (d / "config.json").write_text("")
        (d / "model.safetensors").write_bytes(b"\x13not a safetensors file" * 10)
        return str(d)
    shutil.copytree(model_dir, d)
    if how == "notok":
        for f in d.iterdir():
            if f.name.startswith(
                ("tokenizer", "special_tokens", "chat_template", "vocab", "merges")
            ):
                f.unlink()
    else:
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return str(d)


def _pickle_only(tmp: Path, model_dir: Path) -> str:
    """A copy of a model folder whose weights are a pickle (pytorch_model.bin) only."""
    import shutil

    import torch
    from safetensors.torch import load_file

    d = tmp / "pickled"
    shutil.copytree(model_dir, d)
    weights = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(weights, d / "pytorch_model.bin")
    return str(d)


def test_at_least_25_mistakes_are_covered():
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_user_mistake_is_one_line_exit_2(name, argv, expected, tmp_path, tiny_model_dir, capsys):
    args = [str(a) for a in argv(tmp_path, tiny_model_dir)]
    rc = main(args)
    out = capsys.readouterr()
    err = out.err.strip()
    assert rc == 2, f"exit {rc}; stderr: {err[-2000:]}"
    assert "Traceback" not in out.err
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    # Nothing that looks complete: only the fake upstream folders a case made itself.
    made = {p for p in tmp_path.rglob("COMPLETED") if name.startswith("ppo-")}
    assert set(tmp_path.rglob("COMPLETED")) == made
