"""One place that builds the Accelerator, picks the precision, seeds every RNG and sets up
the process. CPU ranks need `Accelerator(cpu=True)` (else each sees world_size 1) and gloo."""

from __future__ import annotations

import logging
import os
import platform
from typing import Any

import torch

from rlhf.infra import distributed

# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA, formerly DNNL_MAX_CPU_ISA) that leave out the bf16
# dot-product instructions: under them oneDNN converts bf16 to fp32 like a CPU without them.
_ONEDNN_ISAS_WITHOUT_BF16 = {
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
}
_X86_MACHINES = {"x86_64", "amd64", "i386", "i686"}  # platform.machine(), lower case


def cpu_supports_fast_bf16() -> bool:
    """bf16 autocast is a win only where the CPU multiplies in bf16: AVX512-BF16 or AMX on x86.
    torch's own check is also true on plain AVX-512, where oneDNN converts bf16 to fp32 and
    back (slower than fp32); on ARM it already asks for the instructions."""
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if platform.machine().lower() not in _X86_MACHINES:
            return onednn
        instructions = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except (AttributeError, RuntimeError):
        return False
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    return onednn and bool(instructions) and cap.strip().upper() not in _ONEDNN_ISAS_WITHOUT_BF16


def resolve_precision(precision: str) -> str:
    """`auto` -> bf16 where the hardware has it, else fp32. Returns accelerate's spelling."""
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_fast_bf16() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def frozen_weight_dtype(mixed_precision: str, sharding: str = "") -> torch.dtype | None:
    """The dtype frozen matmul weights are stored in for accelerate's `mixed_precision`: the
    autocast dtype, or None in an fp32 run. None under ZeRO-3 (`sharding`): DeepSpeed's own
    F.linear does not autocast on CPU ranks, so an fp32 activation would meet a bf16 weight."""
    if sharding == "zero3":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(mixed_precision))


def make_accelerator(recipe: Any, gradient_accumulation_steps: int = 1) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, set_seed

    on_cpu = not torch.cuda.is_available()
    mixed = resolve_precision(recipe.precision)
    if on_cpu and mixed == "fp16":
        mixed = "bf16"  # fp16 autocast is not supported on CPU
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # gloo for DeepSpeed on CPU; in a single process there is no group to name.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu and launched else []
    # accelerate honours ACCELERATE_USE_DEEPSPEED only with cpu=False (else it runs plain DDP).
    deepspeed = distributed.requested("DEEPSPEED")
    if on_cpu and launched and distributed.requested("FSDP"):
        distributed.use_fsdp_on_cpu_ranks()
    accelerator = Accelerator(
        cpu=on_cpu and not deepspeed,
        mixed_precision=mixed,
        # The loops decide where an accumulation window ends (training.accumulation_window).
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=gradient_accumulation_steps, sync_with_dataloader=False
        ),
        kwargs_handlers=handlers,
        log_with=list(recipe.tracking.trackers) or None,
    )
    set_seed(recipe.seed)  # the same on every rank; sampling RNGs are offset by rank where needed
    setup_logging(accelerator.is_main_process)
    return accelerator


def setup_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", force=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for noisy in ("transformers", "datasets", "accelerate", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def run_info(accelerator: Any) -> dict[str, Any]:
    return {
        "world_size": accelerator.num_processes,
        # ranks on this machine (torchrun sets it); world_size / local_world_size = machines
        "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)),
        "distributed_type": str(accelerator.distributed_type),
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "torch_threads": torch.get_num_threads(),
    }
