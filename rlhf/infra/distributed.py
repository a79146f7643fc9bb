"""Everything the stages need to know about sharded training (DeepSpeed ZeRO-3, FSDP), in one place.

DDP, DeepSpeed ZeRO-1/2 and a single process keep a full copy of every parameter on each rank:
generation, evaluation and saving work on the unwrapped module, and every helper here is a
no-op. ZeRO-3 and FSDP shard the parameters themselves, which changes three things:

1. A forward of the sharded model is a collective (parameters are all-gathered layer by layer),
   so every rank must run the same number of forwards, in step. `generate` must keep ranks that
   finished early stepping until all are done (`synced_gpus`), and evaluation must give every
   rank the same number of batches (`rank_indices`).
2. Saving needs the full state dict, gathered by every rank (`full_state_dict`), written by
   rank 0. For ZeRO-3 the config must set `zero3_save_16bit_model: true`; for FSDP,
   accelerate gathers a full state dict to rank 0's CPU. Checkpoints for `--resume` stay
   sharded: one file per rank (ZeRO-3; FSDP2 with SHARDED_STATE_DICT).
3. Frozen roles (PPO reference and reward model) are NOT prepared: each rank holds a plain,
   unsharded copy on its device and runs it independently. Under ZeRO-3 with
   `zero3_init_flag`, `from_pretrained` would partition them at load time (transformers sees
   the DeepSpeed config), so they are loaded inside `unsharded_init`.

All of this also runs on CPU ranks over gloo (tests, `recipes/accelerate/*-cpu.yaml`):
DeepSpeed picks its CPU accelerator by itself; FSDP needs `use_fsdp_on_cpu_ranks` first.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

log = logging.getLogger(__name__)


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
    """`generate(synced_gpus=...)`: True when parameters are sharded over several ranks.

    A rank whose sequences all hit EOS keeps running dummy forwards until every rank is done;
    otherwise the others would wait forever in that rank's missing all-gather. transformers
    only auto-detects this for its own DeepSpeed / FSDP setups, not for a module nested in an
    accelerate-prepared wrapper (our policy inside ActorCritic), so we pass it explicitly.
    """
    state = _state(accelerator)
    return state is not None and is_sharded(accelerator) and state.num_processes > 1


@contextmanager
def gathered_for_generation(accelerator: Any, model: Any) -> Iterator[None]:
    """Make forwards of the UNWRAPPED module (generation, scoring, evaluation) valid.

    `model` is the prepared (wrapped) model. Every rank must enter, and run the same number of
    forwards inside (with `synced_gpus` for `generate`).

    - not sharded (1 process, DDP, ZeRO-1/2): no-op.
    - ZeRO-3: no-op on purpose. DeepSpeed hooks every submodule of the engine's module, so a
      forward of the unwrapped policy all-gathers each layer just in time and frees it after;
      peak memory stays one layer above the shards. The faster alternative, gathering the whole
      model with `deepspeed.zero.GatheredParameters` (TRL's `unwrap_model_for_generation`),
      only works after removing those hooks through DeepSpeed internals (the hooks would
      re-partition gathered parameters after each layer), and needs the full model per rank.
    - FSDP1: `summon_full_params(recurse=False)` materialises the root's own flat parameter
      (embeddings, LM head, value head, which the auto wrap leaves at the root); the wrapped
      decoder layers all-gather themselves in their forward, as TRL does for generation.
    - FSDP2: the same, with the root's `unshard()` / `reshard()`. The root is initialised
      first: FSDP2 otherwise elects the first module to run forward (a decoder layer) as root.
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


def fsdp_requested() -> bool:
    """The launcher asked for FSDP (`distributed_type: FSDP` in the accelerate config)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def use_fsdp_on_cpu_ranks() -> None:
    """Let `Accelerator(cpu=True)` honour an FSDP launch on CPU ranks (gloo). Call it first.

    accelerate 1.15 enables FSDP only for accelerator-backed process groups (MULTI_GPU, ...):
    with `cpu=True` the state is MULTI_CPU and the FSDP config is dropped without a word (each
    rank then trains a full DDP copy). torch's FSDP2 itself runs on a CPU DeviceMesh. So the
    gloo group is built here and labelled MULTI_GPU, which is exactly the state a GPU FSDP
    launch has before the Accelerator turns it into FSDP; the device stays the CPU.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True, backend="gloo")
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.MULTI_GPU


_left_a_group = False  # set by leave_process_group; read by left_process_group


def leave_process_group() -> None:
    """End this rank's part of the process group; every rank calls it once, after its last
    collective (the stage's final barrier), before the process exits. A no-op in one process.

    Left to interpreter shutdown, the gloo group's threads can be torn down while joinable
    ("terminate called without an active exception", SIGABRT) after the peer has closed its
    sockets: that rank's launcher then fails, and a launcher on another machine waits for it.
    That is not enough on its own: see `exit_code_of_rank`.
    """
    global _left_a_group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _left_a_group = True


def left_process_group() -> bool:
    """This process has left a process group (`leave_process_group` destroyed one)."""
    return _left_a_group


def exit_code_of_rank(code: int) -> int:
    """`code`, returned; but a rank that has left its process group ends here, with `code`,
    without the interpreter's finalization (stdout, stderr and logging flushed first).

    destroy_process_group joins gloo's worker threads only when nothing else holds the group;
    FSDP2's DeviceMesh, for one, still does, so the threads outlive it. A worker that drops
    the last reference to a finished collective (a barrier holds the all-gather before it)
    frees that tensor's Python object and takes the GIL to do so. Once the main thread is
    finalizing, taking the GIL ends the worker thread, the unwind hits a noexcept destructor
    and the process aborts (SIGABRT, after every output was written): 2 of 29 two-rank FSDP2
    launches of tests/dist_sharded.py here, and a CI failure; 0 of 75 with this
    (pytorch/pytorch#190489, open). Skipping finalization leaves no such window. Nothing is
    lost: every output is written and closed before the stage's final barrier
    (runner.finish, the tracker's close).
    """
    if not left_process_group():
        return code
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code)


def deepspeed_requested() -> bool:
    """The launcher asked for DeepSpeed (`distributed_type: DEEPSPEED`)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def writable(accelerator: Any, params: list[Any]) -> Any:
    """Context in which in-place writes to `params` (of a prepared model) reach every shard.

    ZeRO-3 leaves each parameter an empty placeholder outside a forward: a `fill_` on it is
    silently lost. `GatheredParameters(modifier_rank=0)` gathers them, and on exit
    re-partitions rank 0's values to all ranks. Every rank must enter. FSDP2's DTensors and
    unsharded parameters take in-place pointwise writes directly.
    """
    if sharding(accelerator) == "zero3":
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return nullcontext()


def set_deepspeed_micro_batch(accelerator: Any, micro_batch: int) -> None:
    """Give DeepSpeed its per-rank micro-batch when no dataloader is prepared (PPO).

    DeepSpeed's config needs `train_micro_batch_size_per_gpu`; accelerate fills "auto" from a
    prepared dataloader's batch size and refuses `prepare(model, optimizer)` without one.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch


def full_numel(param: Any) -> int:
    """Elements of the whole parameter. A ZeRO-3 parameter is an empty placeholder outside a
    forward (`numel() == 0`); DeepSpeed keeps the full size in `ds_numel`. A DTensor (FSDP2)
    reports its global size."""
    return int(getattr(param, "ds_numel", param.numel()))


def full_ndim(param: Any) -> int:
    """Dimensions of the whole parameter (a ZeRO-3 placeholder is 1-D; `ds_shape` is real)."""
    return len(getattr(param, "ds_shape", param.shape))


def local_numel(param: Any) -> int:
    """Elements of the parameter this rank holds: its ZeRO-3 partition (`ds_tensor`, padded to
    a multiple of the world size), its FSDP2 local shard, or all of it when not sharded."""
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
    """Elements of `model` each rank holds, gathered to every rank (a collective: every rank
    calls it). Sharded: about total / world each; DDP or a plain copy: the total on each."""
    import torch

    held = torch.tensor([parameters_on_rank(model)[0]], device=accelerator.device)
    return [int(x) for x in accelerator.gather(held).tolist()]


def rank_indices(n: int, accelerator: Any) -> list[int]:
    """This rank's share of n evaluation items: rank, rank + world, ...

    Under sharding every rank must run the same number of forwards, so the shorter shares are
    padded with items from the start (at most world - 1 items are then evaluated twice; callers
    that key results by index are unaffected). Without sharding the shares are disjoint.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, n, world))
    if is_sharded(accelerator) and n > 0:
        per_rank = -(-n // world)
        mine += [k % n for k in range(per_rank - len(mine))]
    return mine


def unsharded_init(accelerator: Any) -> Any:
    """Context to load a model that must stay a plain full copy on each rank (frozen roles).

    Under ZeRO-3, accelerate registers the DeepSpeed config with transformers, and
    `from_pretrained` then partitions the weights at load time (deepspeed.zero.Init).
    accelerate's own `zero3_init_context_manager(enable=False)` does not prevent it in
    accelerate 1.15 (it re-registers the same stage-3 config), so the registration is
    removed for the load and restored after.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        return _without_transformers_zero3(plugin)
    if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() in ("1", "true"):
        # FSDP cpu_ram_efficient_loading: transformers loads on ranks > 0 as empty (meta)
        # tensors, to be filled by FSDP's broadcast, which never happens for a frozen role.
        return _env_override("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
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


@contextmanager
def _env_override(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def full_state_dict(accelerator: Any, model: Any, prefix: str = "") -> dict[str, Any] | None:
    """The full, unsharded state dict of a prepared model, for `save_pretrained(state_dict=...)`.

    Collective under sharding: EVERY rank must call it; the result is complete on rank 0 only.
    Returns None when not sharded (the unwrapped module already holds full weights: save it
    directly). `prefix` selects a submodule ("policy." of ActorCritic) and strips it.
    """
    if not is_sharded(accelerator):
        return None
    state = accelerator.get_state_dict(model)  # ZeRO-3: needs zero3_save_16bit_model: true
    if state is None:  # ZeRO-3 consolidates on rank 0 only
        return None
    # FSDP2's full state dict has a tied parameter (LM head = embeddings) once per name, as
    # separate tensors, which save_pretrained would write twice (ZeRO-3's has it once): keep
    # the first name, as the unsharded model's own state dict does.
    first: dict[int, str] = {}
    for name, param in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            state.pop(name, None)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def gather_evaluated(accelerator: Any, values: Any, n: int) -> Any:
    """Every rank's per-item results over `rank_indices(n)` -> the n items' results, in order.

    `gather_for_metrics` drops the duplicates that padding adds only for a prepared dataloader;
    the padded shares of `rank_indices` would otherwise count up to world - 1 items twice.
    Shares are padded to one length here (unsharded shares differ by one), gathered, and each
    item is read from the rank that owns it: item i is rank i % world's entry i // world.
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
