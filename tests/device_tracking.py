"""A CPU stand-in for an accelerator, to catch code that would put a tensor on the wrong device.

On a CPU machine every tensor is on the CPU, so a hard-coded `device="cpu"` or a factory call
that forgets its `device=` goes unnoticed until the code first runs on a GPU. Inside
`ModelDeviceMode` the tensors that existed when it started (the model's parameters, the
prompts) and everything made from them report the device `meta` instead: the "model device".
A tensor made without a device, or on the CPU by name, is a "host tensor", and reports `cpu`.
The computation itself stays on the CPU. Recorded as faults, as CUDA would refuse or silently
copy them:
  - a tensor factory that names the CPU explicitly (`device="cpu"`);
  - an operation that mixes host tensors with model-device tensors, except where PyTorch
    allows it on CUDA too: 0-dim host tensors, indices, `.to` / `copy_`.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

MODEL_DEVICE = torch.device("cuda", 0)
HOST = torch.device("cpu")
FACTORIES = {
    "zeros",
    "ones",
    "full",
    "empty",
    "arange",
    "tensor",
    "as_tensor",
    "rand",
    "randn",
    "randint",
    "randperm",
    "linspace",
    "eye",
    "zeros_like",
    "ones_like",
    "full_like",
    "empty_like",
    "rand_like",
    "randn_like",
    "randint_like",
    "new_zeros",
    "new_ones",
    "new_full",
    "new_empty",
    "new_tensor",
    "scalar_tensor",
    "empty_strided",
}
DEVICE_GETTERS = {torch._C.TensorBase.device: "device", torch._C.TensorBase.is_cpu: "is_cpu"}
MOVES = {"to", "copy_", "cpu", "__setitem__"}
# Code that checks a device type against the real accelerators it supports: it sees the CPU.
SEES_THE_REAL_DEVICE = ("/kernels/", "/integrations/hub_kernels.py")


class ModelDeviceMode(TorchFunctionMode):
    """Records device faults (see the module docstring) in `self.faults`, each with the
    innermost frame of the project's code that caused it."""

    def __init__(self) -> None:
        super().__init__()
        self.host = WeakTensorKeyDictionary()  # the host tensors
        self.faults: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        getter = DEVICE_GETTERS.get(getattr(func, "__self__", None))
        if getter:
            on_host = args[0] in self.host or _caller_sees_the_real_device()
            if getter == "device":
                return HOST if on_host else MODEL_DEVICE
            return on_host
        if func is torch.device:  # torch.device("cuda:0") stays the model device
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        named = kwargs.get("device")
        if name in FACTORIES and named is not None and torch.device(named).type == "cpu":
            self.fault(f"{name}(device={named!r})")
        target = _move_target(name, args, kwargs)
        args, kwargs = tree_map(_real_device, (args, kwargs))
        if name not in MOVES:
            self.check_mixing(name, args, kwargs)
        out = func(*args, **kwargs)
        self.place(out, name, args, kwargs, named, target)
        return out

    def check_mixing(self, name: str, args: tuple, kwargs: dict) -> None:
        if name == "__getitem__":
            index = [t for t in tree_flatten(args[1:])[0] if isinstance(t, torch.Tensor)]
            if args[0] in self.host and any(t not in self.host for t in index):
                self.fault(f"a host tensor {tuple(args[0].shape)} indexed by a model-device one")
            args = args[:1]  # a host index may index a device tensor
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        host = [t for t in tensors if t in self.host and t.dim() > 0]
        if host and len(host) < len([t for t in tensors if t.dim() > 0 or t not in self.host]):
            self.fault(f"{name} mixes a host tensor {tuple(host[0].shape)} with model-device ones")

    def place(self, out, name, args, kwargs, named, target) -> None:
        """Marks the results that a CUDA run would hold on the host."""
        results = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if target is not None:
            on_host = target.type == "cpu"
        elif named is not None:
            on_host = torch.device(named).type == "cpu"
        elif name == "cpu":
            on_host = True
        else:
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            device_inputs = [t for t in inputs if t not in self.host]
            on_host = not device_inputs if inputs else name in FACTORIES or not results
        for t in results:
            if on_host:
                self.host[t] = True
            else:
                self.host.pop(t, None)

    def fault(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack() if "/rlhf/" in f.filename]
        where = "?"
        if frames:
            where = f"rlhf/{frames[-1].filename.split('/rlhf/')[-1]}:{frames[-1].lineno}"
        self.faults.append(f"{where}: {what}")


def _caller_sees_the_real_device() -> bool:
    caller = sys._getframe(2).f_code.co_filename
    return any(part in caller for part in SEES_THE_REAL_DEVICE)


def _real_device(value: Any) -> Any:
    """The model device, as code passes it on, back to the CPU where the work really runs."""
    if isinstance(value, torch.device | str) and _is_model_device(value):
        return HOST
    return value


def _is_model_device(value: Any) -> bool:
    try:
        return torch.device(value).type == MODEL_DEVICE.type
    except (RuntimeError, TypeError):
        return False


def _move_target(name: str, args: tuple, kwargs: dict) -> torch.device | None:
    """Where `.to(...)` sends a tensor (None: it stays where it is)."""
    if name != "to":
        return None
    for value in (*args[1:], kwargs.get("device")):
        if isinstance(value, torch.Tensor):
            return None  # .to(other): follows `other`; treated as staying put
        if isinstance(value, torch.device | str):
            try:
                return torch.device(value)
            except RuntimeError:
                continue
    return None
