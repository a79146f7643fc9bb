"""Worker: this machine's limits, measured in the same run as the PPO numbers.

  matmul peak   torch.matmul on large square matrices, fp32 and bf16 (2 n^3 FLOPs per product)
  bandwidth     reading a large fp32 tensor (torch.sum): the bound for generation, which reads
                every weight once per generated token
Each figure is the median of `repeats` timed runs after one warm-up.
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.common import log, read_json, self_peak_rss_mb, worker_args, write_json


def _median_seconds(fn, repeats: int) -> float:
    start = time.perf_counter()
    fn()  # warm-up: first-call allocations and kernel selection
    if time.perf_counter() - start > 5.0:
        repeats = 1  # e.g. bf16 on a CPU without bf16 units: one timed run is plenty
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(n: int, dtype: torch.dtype, repeats: int) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    seconds = _median_seconds(lambda: torch.matmul(a, b), repeats)
    return 2 * n**3 / seconds / 1e9


def read_bandwidth_gbs(mib: int, repeats: int) -> float:
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    seconds = _median_seconds(lambda: x.sum(), repeats)
    return x.numel() * 4 / seconds / 1e9


def main() -> None:
    args = worker_args(__doc__.splitlines()[0])
    spec = read_json(args.spec)
    n, repeats = spec["matmul_n"], spec["repeats"]
    out = {
        "matmul_n": n,
        "fp32_gflops": matmul_gflops(n, torch.float32, repeats),
        "bf16_gflops": matmul_gflops(n, torch.bfloat16, repeats),
        "read_bandwidth_mib": spec["bandwidth_mib"],
        "read_bandwidth_gbs": read_bandwidth_gbs(spec["bandwidth_mib"], repeats),
        "torch_threads": torch.get_num_threads(),
        "self_peak_rss_mb": self_peak_rss_mb(),
    }
    log(
        f"matmul {n}: fp32 {out['fp32_gflops']:.0f} GFLOP/s, bf16 {out['bf16_gflops']:.0f} "
        f"GFLOP/s, read {out['read_bandwidth_gbs']:.1f} GB/s"
    )
    write_json(args.out, out)


if __name__ == "__main__":
    main()
