"""Progress without a terminal: INFO lines every ~10% of the steps, at most one per 30 s, the
first and last always; and a default run's stderr free of third-party deprecation warnings."""

import re
import subprocess
import sys

import pytest

from rlhf.infra.progress import Progress, eta_seconds, format_duration
from tests.test_pipeline import _overrides, _write_data


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def logged_steps(total: int, seconds_per_step: float, initial: int = 0, **kw) -> list[str]:
    clock = FakeClock()
    progress = Progress("ppo", total, initial, tty=False, clock=clock, unit="iteration", **kw)
    for step in range(initial + 1, total + 1):
        clock.now += seconds_per_step
        progress.update(step, score=0.5)
    progress.close()
    return progress.lines


def test_format_duration_and_eta():
    assert [format_duration(s) for s in (0, 12, 62, 3720)] == ["0s", "12s", "1m02s", "1h02m"]
    assert eta_seconds(2, 8, 10.0) == 40.0  # 5 s a step, 8 steps left
    assert eta_seconds(0, 8, 10.0) is None


def _steps(lines: list[str]) -> list[int]:
    return [int(re.search(r"iteration (\d+)/", line).group(1)) for line in lines]


def test_slow_steps_log_every_tenth():
    # 5 s a step: every 10 steps is 50 s apart, over the 30 s floor.
    lines = logged_steps(100, 5.0)
    assert _steps(lines) == [1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 100]
    # step 11 at t=55 s: 89 steps left at 5 s each = 445 s
    assert lines[1] == "ppo: iteration 11/100 (11%), score 0.5, elapsed 55s, ETA 7m25s"
    assert lines[-1].endswith("elapsed 8m20s, ETA 0s")


def test_fast_steps_log_at_most_every_30_seconds():
    # 1 s a step: step 11 is due by count but only 10 s after the first line; step 31 is the
    # first that is both 10 steps and 30 s later, then 61, 91, and the last always.
    assert _steps(logged_steps(100, 1.0)) == [1, 31, 61, 91, 100]


def test_resumed_run_counts_from_where_it_resumed():
    lines = logged_steps(50, 10.0, initial=40)
    assert _steps(lines) == [41, 46, 50]  # every 5 steps (10% of 50), 50 s apart
    assert lines[0].endswith("elapsed 10s, ETA 1m30s")  # 9 left at 10 s each


def test_terminal_and_other_ranks_write_no_lines():
    clock = FakeClock()
    for progress in (
        Progress("sft", 3, tty=True, clock=clock),
        Progress("sft", 3, tty=False, enabled=False, clock=clock),
    ):
        for step in (1, 2, 3):
            progress.update(step, loss=1.0)
        progress.close()
        assert progress.lines == []


@pytest.fixture(scope="module")
def piped_stage_logs(tmp_path_factory):
    """The three tiny stages as a user's `make ... > log` runs them: stderr is a pipe."""
    root = tmp_path_factory.mktemp("piped")
    args = _overrides(root, _write_data(root))
    logs = {}
    for stage in ("sft", "reward", "ppo"):
        cmd = [sys.executable, "-m", "rlhf.cli", stage, "recipes/tiny.yaml", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        logs[stage] = proc.stderr
    return logs


def test_every_stage_logs_progress_without_a_terminal(piped_stage_logs):
    # tiny.yaml: sft and reward 4 steps, ppo 2 iterations; first and last always logged.
    expected = {
        "sft": ["sft: step 1/4 (25%), loss ", "sft: step 4/4 (100%), loss "],
        "reward": ["reward: step 1/4 (25%), loss ", "reward: step 4/4 (100%), loss "],
        "ppo": ["ppo: iteration 1/2 (50%), score ", "ppo: iteration 2/2 (100%), score "],
    }
    for stage, starts in expected.items():
        lines = [x.split(" INFO ", 1)[-1] for x in piped_stage_logs[stage].splitlines()]
        progress = [x for x in lines if re.match(rf"{stage}: (step|iteration) \d", x)]
        assert len(progress) == 2, piped_stage_logs[stage]
        for line, start in zip(progress, starts):
            assert line.startswith(start) and ", elapsed " in line and ", ETA " in line
        assert "\r" not in piped_stage_logs[stage]  # no progress bar in a log


def test_default_run_has_no_deprecation_warnings(piped_stage_logs):
    # PPO wraps the policy in LoRA: peft used to trigger transformers' FutureWarning
    # "`is_gradient_checkpointing` is deprecated".
    for stage, err in piped_stage_logs.items():
        noisy = [x for x in err.splitlines() if re.search(r"deprecat|FutureWarning", x, re.I)]
        assert noisy == [], f"{stage}: {noisy}"
