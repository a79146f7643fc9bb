"""Everything the stages need to know about sharded training (DeepSpeed ZeRO-3, FSDP).

DDP, ZeRO-1/2 and a single process keep a full copy of every parameter on each rank, and every
helper here is a no-op. ZeRO-3 and FSDP shard the parameters, which changes three things:

1. A forward is a collective, so every rank runs the same number of forwards: `synced_gpus`
   for `generate`, `rank_indices` for evaluation.
2. Saving gathers the full state dict on every rank (`full_state_dict`); rank 0 writes it.
3. Frozen roles (reference, reward model) stay a plain copy per rank, loaded inside
   `unsharded_init` so that ZeRO-3 does not partition them at load time.

All of this also runs on CPU ranks over gloo; FSDP there needs `use_fsdp_on_cpu_ranks` first.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any
from unittest import mock


def _state(accelerator: Any | None) -> Any | None:
    if accelerator is not None:
        return accelerator.state
    from accelerate.state import AcceleratorState

    # Not yet built (unit tests, scripts without accelerate): nothing is sharded.
    return AcceleratorState() if AcceleratorState._shared_state else None


def sharding(accelerator: Any | None = None) -> str:
    """`zero3`, `fsdp1` or `fsdp2` when the parameters are sharded across ranks, else ""."""
    state = _state(accelerator)
    if state is None:
        return ""
    from accelerate.utils import DistributedType

    kind = getattr(state, "distributed_type", None)
    if kind == DistributedType.DEEPSPEED:
        plugin = getattr(state, "deepspeed_plugin", None)
        return "zero3" if plugin is not None and plugin.zero_stage == 3 else ""
    if kind == DistributedType.FSDP:
        plugin = getattr(state, "fsdp_plugin", None)
        return f"fsdp{getattr(plugin, 'fsdp_version', 1) or 1}"
    return ""


def is_sharded(accelerator: Any | None = None) -> bool:
    return sharding(accelerator) != ""


def synced_gpus(accelerator: Any | None = None) -> bool:
    """`generate(synced_gpus=...)`: True when parameters are sharded over several ranks (a rank
    that is done keeps running dummy forwards, or the others wait in its missing all-gather).
    transformers does not detect it for our policy nested in an accelerate wrapper."""
    return is_sharded(accelerator) and _state(accelerator).num_processes > 1


@contextmanager
def gathered_for_generation(accelerator: Any, model: Any) -> Iterator[None]:
    """Make forwards of the UNWRAPPED module of the prepared `model` valid (generation,
    scoring, evaluation). Every rank enters and runs the same number of forwards inside.

    ZeRO-3 needs nothing: DeepSpeed's hooks gather each layer of the unwrapped module just in
    time. FSDP1 / FSDP2 materialise the root's own parameters (embeddings, LM head, value
    head); the wrapped decoder layers gather themselves, as in TRL's generation. FSDP2's root
    is initialised first, or it would elect the first module to run forward as root.
    """
    kind = sharding(accelerator)
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, recurse=False, writeback=False):
            yield
    elif kind == "fsdp2":
        state = model._get_fsdp_state()  # torch's FSDPModule; private, as in accelerate
        state._lazy_init()
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    else:
        yield


def requested(backend: str) -> bool:
    """The launcher asked for `backend` ("FSDP" or "DEEPSPEED", the accelerate config's
    distributed_type)."""
    return os.environ.get(f"ACCELERATE_USE_{backend}", "false").lower() == "true"


def use_fsdp_on_cpu_ranks() -> None:
    """Let `Accelerator(cpu=True)` honour an FSDP launch on CPU ranks (gloo). Call it first.

    accelerate drops the FSDP config of a MULTI_CPU state without a word, though torch's FSDP2
    runs on a CPU DeviceMesh: the gloo group is built here and labelled MULTI_GPU, the state a
    GPU FSDP launch has before the Accelerator turns it into FSDP.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True, backend="gloo")
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.MULTI_GPU


_left_a_group = False  # set by leave_process_group; read by left_process_group


def leave_process_group() -> None:
    """End this rank's part of the process group, after its last collective; a no-op in one
    process. Left to interpreter shutdown, gloo's threads can abort the process (SIGABRT)."""
    global _left_a_group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _left_a_group = True


def left_process_group() -> bool:
    """This process has left a process group (`leave_process_group` destroyed one)."""
    return _left_a_group


def exit_code_of_rank(code: int) -> int:
    """`code`, returned; but a rank that has left its process group exits here with `code`,
    skipping the interpreter's finalization (output and logging flushed first).

    gloo's worker threads can outlive the group (FSDP2's DeviceMesh still holds it); one that
    takes the GIL while the interpreter finalizes aborts the process (pytorch/pytorch#190489).
    Every output is written and closed before the stage's final barrier.
    """
    if not left_process_group():
        return code
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code)


def writable(accelerator: Any, params: list[Any]) -> Any:
    """Context in which in-place writes to `params` (of a prepared model) reach every shard;
    every rank enters. A ZeRO-3 parameter is an empty placeholder outside a forward: it is
    gathered, and rank 0's values re-partitioned on exit. FSDP2's DTensors need nothing."""
    if sharding(accelerator) == "zero3":
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return nullcontext()


def set_deepspeed_micro_batch(accelerator: Any, micro_batch: int) -> None:
    """Give DeepSpeed its `train_micro_batch_size_per_gpu` when no dataloader is prepared
    (PPO): accelerate fills "auto" only from a prepared dataloader."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch


def full_numel(param: Any) -> int:
    """Elements of the whole parameter (a ZeRO-3 placeholder keeps it in `ds_numel`)."""
    return int(getattr(param, "ds_numel", param.numel()))


def full_ndim(param: Any) -> int:
    """Dimensions of the whole parameter (a ZeRO-3 placeholder is 1-D; `ds_shape` is real)."""
    return len(getattr(param, "ds_shape", param.shape))


def local_numel(param: Any) -> int:
    """Elements of the parameter this rank holds: its ZeRO-3 partition, FSDP2 shard, or all."""
    if hasattr(param, "ds_tensor"):
        return int(param.ds_tensor.numel())
    if hasattr(param, "to_local"):
        return int(param.to_local().numel())
    return int(param.numel())


def parameters_on_rank(model: Any) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model): how much sharding saved."""
    params = list(model.parameters())
    return sum(map(local_numel, params)), sum(map(full_numel, params))


def parameters_per_rank(accelerator: Any, model: Any) -> list[int]:
    """Elements of `model` each rank holds, gathered to every rank (a collective)."""
    import torch

    held = torch.tensor([parameters_on_rank(model)[0]], device=accelerator.device)
    return [int(x) for x in accelerator.gather(held).tolist()]


def rank_indices(n: int, accelerator: Any) -> list[int]:
    """This rank's share of n evaluation items: rank, rank + world, ... Under sharding the
    shorter shares are padded with items from the start, so every rank runs as many forwards
    (`gather_evaluated` drops the repeats)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, n, world))
    if is_sharded(accelerator) and n > 0:
        per_rank = -(-n // world)
        mine += [k % n for k in range(per_rank - len(mine))]
    return mine


def unsharded_init(accelerator: Any) -> Any:
    """Context to load a model that stays a plain full copy on each rank (frozen roles).

    Under ZeRO-3 the DeepSpeed config registered with transformers makes `from_pretrained`
    partition the weights (accelerate's `zero3_init_context_manager(enable=False)` re-registers
    it), so the registration is removed for the load and restored after.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        return _without_transformers_zero3(plugin)
    if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() in ("1", "true"):
        # FSDP cpu_ram_efficient_loading: transformers loads on ranks > 0 as empty (meta)
        # tensors, to be filled by FSDP's broadcast, which never happens for a frozen role.
        return mock.patch.dict(os.environ, {"FSDP_CPU_RAM_EFFICIENT_LOADING": "false"})
    return nullcontext()


@contextmanager
def _without_transformers_zero3(plugin: Any) -> Iterator[None]:
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if getattr(plugin, "dschf", None) is not None:  # registered by accelerate: restore it
            set_hf_deepspeed_config(plugin.dschf)


def full_state_dict(accelerator: Any, model: Any, prefix: str = "") -> dict[str, Any] | None:
    """The full state dict of a prepared model, for `save_pretrained(state_dict=...)`.

    Collective under sharding (every rank calls it; complete on rank 0 only); None when not
    sharded (save the unwrapped module). `prefix` selects a submodule and strips it.
    """
    if not is_sharded(accelerator):
        return None
    state = accelerator.get_state_dict(model)  # ZeRO-3: needs zero3_save_16bit_model: true
    if state is None:  # ZeRO-3 consolidates on rank 0 only
        return None
    # FSDP2's has a tied parameter (LM head = embeddings) once per name: keep the first name.
    first: dict[int, str] = {}
    for name, param in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            state.pop(name, None)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def gather_evaluated(accelerator: Any, values: Any, n: int) -> Any:
    """Every rank's per-item results over `rank_indices(n)` -> the n items' results, in order.

    Shares are padded to one length, gathered, and item i is read from its owner: rank
    i % world's entry i // world (so `rank_indices`' repeats are not counted twice).
    """
    import torch

    world = accelerator.num_processes
    per_rank = -(-n // world) if n else 0
    values = values[:per_rank]
    if len(values) < per_rank:  # a shorter, unpadded share: fill with zeros (dropped below)
        fill = values.new_zeros(per_rank - len(values), *values.shape[1:])
        values = torch.cat([values, fill])
    gathered = accelerator.gather(values.contiguous())
    order = [(i % world) * per_rank + i // world for i in range(n)]
    return gathered[torch.tensor(order, dtype=torch.long, device=gathered.device)]
