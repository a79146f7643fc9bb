"""Fault injection (`make chaos`): SIGKILL a tiny PPO run at 10 random moments, resume each
(as often as it takes), and compare with the uninterrupted run: final weights bitwise, the
held-out evaluation, and every logged metric except wall-clock timings.

Why bitwise: on CPU with a fixed seed every source of randomness is re-derived from
(seed, iteration, rank) at the start of each iteration, and a checkpoint after every
iteration holds the weights, AdamW moments, scheduler and KL controller exactly.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_pipeline import _overrides, _write_data

pytestmark = pytest.mark.slow
TRIALS = int(os.environ.get("CHAOS_TRIALS", "3"))  # `make chaos` runs 10
PPO_ARGS = ["ppo.iterations=6", "ppo.save_every=1", "ppo.keep_last=2"]


def _cli(stage: str, args: list[str], **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rlhf.cli", stage, "recipes/tiny.yaml", *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def _finish(stage: str, args: list[str]) -> str:
    proc = _cli(stage, args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return err


def _comparable_metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k != "time" and not k.startswith(("timing/", "tokens_per"))}
        for r in rows
    ]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """One SFT and one reward run that every PPO run below reads."""
    root = tmp_path_factory.mktemp("chaos")
    args = _overrides(root, _write_data(root))
    for stage in ("sft", "reward"):
        _finish(stage, args)
    return root, args


# rloo (no value head, k samples per prompt) gets one trial: the resume path is the same code,
# what differs is the model without a value head and the grouped batches. That one trial kills
# right after the first checkpoint appears, so it always resumes mid-run.
ESTIMATORS = {
    "gae": ([], TRIALS, "random"),
    "rloo": (["ppo.estimator=rloo", "ppo.samples_per_prompt=2"], 1, "after_checkpoint"),
}


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any((run / "checkpoints").glob("step-*/VALID")):
            return
        time.sleep(0.05)


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_sigkill_at_random_moments_then_resume_equals_the_uninterrupted_run(upstream, estimator):
    root, args = upstream
    extra, trials, kill_mode = ESTIMATORS[estimator]
    root = root / estimator
    ref_args = [
        *extra,
        *args,
        f"ppo.sft_dir={root.parent / 'run' / 'sft'}",
        f"ppo.reward_dir={root.parent / 'run' / 'reward'}",
        "eval.judges=[]",  # a skipped judge's message names the run's own output_dir
    ]
    ref_dir = root / "ref"
    t0 = time.time()
    _finish("ppo", [*ref_args, *PPO_ARGS, f"output_dir={ref_dir}"])
    duration = time.time() - t0
    ref = root / "ref" / "ppo"
    ref_weights, ref_eval = _weights(ref), json.loads((ref / "eval.json").read_text())
    ref_metrics = _comparable_metrics(ref)

    rng = random.Random(1234)
    identical, report, real_kills, real_resumes = 0, [], 0, 0
    for trial in range(trials):
        out_dir = root / f"trial{trial}"
        shutil.rmtree(out_dir, ignore_errors=True)
        trial_args = [*ref_args, *PPO_ARGS, f"output_dir={out_dir}"]
        kill_at = rng.uniform(0.05, 0.95) * duration
        started = time.time()
        proc = _cli("ppo", trial_args)
        if kill_mode == "after_checkpoint":
            _wait_for_checkpoint(out_dir / "ppo", proc, timeout=10 * duration)
            kill_at = time.time() - started
        else:
            time.sleep(kill_at)
        run = out_dir / "ppo"
        alive = proc.poll() is None
        if alive:
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        # A kill counts only if it hit before COMPLETED: one that lands while a finished run
        # shuts down interrupts nothing (SIGKILL is immediate, so COMPLETED now tells).
        killed = alive and not (run / "COMPLETED").is_file()
        resumes, from_checkpoint = 0, 0
        while not (run / "COMPLETED").is_file():
            resumes += 1
            assert resumes <= 3, "resume did not finish"
            err = _finish("ppo", [*trial_args, "--resume"])
            from_checkpoint += "resumed from" in err  # else no checkpoint yet: a fresh start
        assert resumes == 0 or killed, "a run not killed before COMPLETED needed a resume"
        if kill_mode == "after_checkpoint":
            assert killed and from_checkpoint >= 1, "the run was not killed mid-run"
        real_kills += killed
        real_resumes += from_checkpoint
        same_weights = ref_weights.keys() == _weights(run).keys() and all(
            torch.equal(ref_weights[k], v) for k, v in _weights(run).items()
        )
        same_eval = json.loads((run / "eval.json").read_text()) == ref_eval
        same_metrics = _comparable_metrics(run) == ref_metrics
        ok = same_weights and same_eval and same_metrics
        identical += ok
        ckpt_dirs = sorted(p.name for p in (run / "checkpoints").glob("*"))
        report.append(
            f"trial {trial}: kill at {kill_at:.1f}s (before COMPLETED={killed}), "
            f"resumes={resumes} (from a checkpoint: {from_checkpoint}), "
            f"weights={same_weights} eval={same_eval} metrics={same_metrics} ckpts={ckpt_dirs}"
        )
    summary = (
        f"{estimator}: {identical} of {trials} identical to the uninterrupted run "
        f"({duration:.1f} s); {real_kills} of {trials} kills hit before COMPLETED; {real_resumes} resumes from a "
        "checkpoint"
    )
    print("\n" + "\n".join(report) + "\n" + summary)
    (root / "chaos_report.txt").write_text("\n".join(report) + "\n" + summary + "\n")
    if os.environ.get("CHAOS_REPORT"):
        with open(os.environ["CHAOS_REPORT"], "a") as f:
            f.write((root / "chaos_report.txt").read_text())
    assert identical == trials, "\n".join(report)
