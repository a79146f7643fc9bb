"""Real multi-process runs on CPU (gloo) through `accelerate launch`.

Every launch asserts world_size == 2 (a launcher that silently starts one rank, or two
unsynchronised ones, must fail here). Equivalence: one optimizer step with 2 ranks x batch b
equals one rank x batch 2b, for SFT (here), the reward model (tests/test_reward.py) and a PPO
update on a fixed rollout batch (here).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_pipeline import _overrides, _write_data

pytestmark = pytest.mark.multiprocess
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
CPU_2PROC = "recipes/accelerate/cpu-2proc.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def stop_launcher(proc: subprocess.Popen) -> None:
    """End a launcher that ran out of time, with its ranks. subprocess.run's SIGKILL would end
    the launcher alone: torchrun starts each rank in a session of its own, and the orphans then
    block in a collective for ever, holding CPU and ports. On SIGTERM torchrun stops them."""
    proc.terminate()
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def run_launch(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True, text=True) for a launcher (see stop_launcher)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_launcher(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# What a rank killed by a signal from native code (SIGABRT, SIGSEGV) leaves on stderr: it has
# no Python traceback, and the launcher's own traceback comes first.
NATIVE_CRASH = ("terminate called", "what():", "Aborted", "free():", "malloc", "Segmentation",
                "Fatal Python error", "gloo", "Gloo")  # fmt: skip


def launch_error(stderr: str) -> str:
    """A failed launch's stderr for the assertion message: the first traceback (the rank that
    failed first; the tail alone shows only the other rank's broken barrier), any lines a
    native crash leaves (NATIVE_CRASH), and the tail."""
    start = stderr.find("Traceback")
    first = stderr[start : start + 2500] if start >= 0 else ""
    native = [line for line in stderr.splitlines() if any(m in line for m in NATIVE_CRASH)]
    crash = "\n".join(native[:20])
    return f"{first}\n...\n{crash}\n...\n{stderr[-2000:]}"


def _launch(module_args: list[str], nproc: int) -> None:
    if nproc == 1:
        cmd = [sys.executable, "-m", *module_args]
    else:
        cmd = [
            ACCELERATE, "launch", "--config_file", CPU_2PROC, "--num_processes", str(nproc),
            "--main_process_port", str(_free_port()), "-m", *module_args,
        ]  # fmt: skip
    out = run_launch(cmd, timeout=400, env=_env())
    assert out.returncode == 0, launch_error(out.stderr)


def _stage(stage: str, args: list[str], nproc: int) -> None:
    _launch(["rlhf.cli", stage, "recipes/tiny.yaml", *args], nproc)


def _run_info(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "run.json").read_text())


def _metric(run: Path, stage: str, key: str) -> list[float]:
    rows = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


# A rank that has left a gloo group (world 1 here) and exits through exit_code_of_rank: the
# buffered stdout and the buffered log must be written, the atexit handler (finalization) not run.
_RANK_EXIT = """
import atexit, logging, logging.handlers, sys
import torch.distributed as dist
from rlhf.infra import distributed
# a buffering handler: the record reaches the file only when logging is shut down
memory = logging.handlers.MemoryHandler(100, target=logging.FileHandler(sys.argv[2]))
logging.basicConfig(handlers=[memory], level=logging.INFO)
assert distributed.exit_code_of_rank(5) == 5  # no group left yet: returned, the process goes on
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
dist.barrier()
atexit.register(print, "finalized")
print("stage output", end="")  # a pipe: block-buffered, only a flush writes it
logging.info("logged")
distributed.leave_process_group()
sys.exit(distributed.exit_code_of_rank(3))
"""


def test_a_rank_that_left_its_group_exits_with_its_code_flushed_and_without_finalization(
    tmp_path,
):
    log = tmp_path / "rank.log"
    cmd = [sys.executable, "-c", _RANK_EXIT, str(_free_port()), str(log)]
    env = {k: v for k, v in _env().items() if k != "PYTHONUNBUFFERED"}  # buffered, as a user's
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "stage output"  # flushed, and no "finalized": atexit never ran
    assert "logged" in log.read_text()


# A stage that fails on a launched rank after leaving its group: rlhf.cli.main prints the
# traceback and ends that rank with status 1 through exit_code_of_rank, without finalization.
_RANK_FAILS = """
import atexit, sys
import torch.distributed as dist
from rlhf import cli
from rlhf.infra import distributed

def failing_stage(args):
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0,
                            world_size=1)
    distributed.leave_process_group()  # as cli._stage's finally does
    raise RuntimeError("boom")

cli._dispatch = failing_stage
atexit.register(print, "finalized")
sys.exit(cli.main(["curves", "some_run"]))
"""


def test_a_rank_whose_stage_fails_prints_the_traceback_and_exits_1_without_finalization():
    cmd = [sys.executable, "-c", _RANK_FAILS, str(_free_port())]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 1, done.stderr
    assert "RuntimeError: boom" in done.stderr and "Traceback" in done.stderr
    assert "finalized" not in done.stdout


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return root, _write_data(root)


def test_sft_two_ranks_equal_one_rank_with_twice_the_batch(data):
    root, paths = data
    runs = {n: root / f"sft-{n}rank" for n in (1, 2)}
    for nproc, run in runs.items():
        args = _overrides(run.parent, paths)
        args[0] = f"output_dir={run}"
        args += [
            "sft.max_steps=1",
            f"sft.batch_size={4 * (2 // nproc)}",
            "sft.optim.warmup_ratio=0",
            "sft.optim.weight_decay=0",
        ]
        _stage("sft", args, nproc)
    assert _run_info(runs[1], "sft")["world_size"] == 1
    assert _run_info(runs[2], "sft")["world_size"] == 2, "two ranks must really synchronise"
    # Same data, loss normalised by the tokens of the whole step: same gradient, same step.
    g1, g2 = _metric(runs[1], "sft", "train/grad_norm"), _metric(runs[2], "sft", "train/grad_norm")
    assert g1 and g1[0] == pytest.approx(g2[0], rel=1e-4)
    l1, l2 = _metric(runs[1], "sft", "train/loss"), _metric(runs[2], "sft", "train/loss")
    assert l1[0] == pytest.approx(l2[0], rel=1e-5)
    w1, w2 = (load_file(r / "sft" / "model" / "model.safetensors") for r in runs.values())
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-5, atol=1e-6, msg=name)


def test_ppo_update_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _launch(["tests.dist_ppo_update", str(one)], 1)
    _launch(["tests.dist_ppo_update", str(two)], 2)
    w1, w2 = load_file(one), load_file(two)
    assert w1.pop("world_size").item() == 1 and w2.pop("world_size").item() == 2
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-5, atol=1e-6, msg=name)
    init = _initial_weights()  # the step did something
    assert sum(not torch.equal(init[k], w1[k]) for k in init) > 0


def _initial_weights() -> dict[str, torch.Tensor]:
    from tests.dist_ppo_update import build_model

    return build_model().state_dict()


def test_every_stage_runs_on_two_ranks(data):
    root, paths = data
    run = root / "pipeline-2rank"
    args = _overrides(root, paths)
    args[0] = f"output_dir={run}"
    for stage in ("sft", "reward", "ppo"):
        _stage(stage, args, 2)
        assert _run_info(run, stage)["world_size"] == 2
        assert (run / stage / "COMPLETED").is_file()
    info = _run_info(run, "ppo")
    assert info["rollouts_per_iteration"] == 2 * info["batch_size_per_rank"]
    # Critic-free with k = 2 (each rank holds whole groups), and the critic warm-up (value-only
    # steps with the policy's gradients dropped after DDP's all-reduce).
    for variant in (
        ["ppo.estimator=rloo", "ppo.samples_per_prompt=2"],
        ["ppo.critic_warmup_iterations=1"],
    ):
        _stage("ppo", [*args, *variant], 2)
        info = _run_info(run, "ppo")
        assert info["world_size"] == 2 and info["status"] == "completed"
    assert info["estimator"] == "gae"


def launch_two_machines(launch_args: list[str], cli_args: list[str], timeout: int = 400) -> None:
    """Two launcher processes, machine_rank 0 and 1, one rank each, rendezvous on 127.0.0.1:
    what `multi-node.yaml` does across machines. `launch_args` choose the engine.

    Each launcher writes to files, not pipes: waiting on launcher 0 while launcher 1's pipe
    fills up (64 KiB) would block its rank in a write, and launcher 0's rank in a collective."""
    port = str(_free_port())
    env = {**_env(), "ACCELERATE_USE_CPU": "true"}
    with tempfile.TemporaryDirectory() as logs:
        procs, errs = [], []
        for machine_rank in (0, 1):
            cmd = [
                ACCELERATE, "launch", *launch_args, "--num_machines", "2",
                "--machine_rank", str(machine_rank), "--num_processes", "2",
                "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                "-m", "rlhf.cli", *cli_args,
            ]  # fmt: skip
            err = Path(logs) / f"machine-{machine_rank}.err"
            with open(err, "w") as f:
                procs.append(
                    subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=f, text=True)
                )
            errs.append(err)
        try:
            for p in procs:
                p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                stop_launcher(p)
            raise
        # Both launchers' ends: a rank that left early shows in the other's error.
        tails = [f"machine_rank {r}, exit {p.returncode}:\n{e.read_text()[-3000:]}"
                 for r, (p, e) in enumerate(zip(procs, errs))]  # fmt: skip
        assert all(p.returncode == 0 for p in procs), "\n".join(tails)


def test_two_machine_launch_on_localhost_completes_sft(data):
    """Two launcher processes, machine_rank 0 and 1, one rank each, rendezvous on 127.0.0.1."""
    root, paths = data
    run = root / "sft-2machines"
    args = _overrides(root, paths)
    args[0] = f"output_dir={run}"
    launch_two_machines(["--multi_gpu"], ["sft", "recipes/tiny.yaml", *args, "sft.max_steps=2"])
    info = _run_info(run, "sft")
    assert info["world_size"] == 2 and info["local_world_size"] == 1  # one rank per "machine"
    assert (run / "sft" / "COMPLETED").is_file()
