"""`precision: auto` on a CPU: bf16 autocast only where the CPU multiplies in bf16
(runtime.cpu_supports_fast_bf16)."""

import os
import subprocess
import sys

import pytest
import torch

from rlhf.infra import runtime


@pytest.mark.parametrize(
    ("onednn_bf16", "avx512_bf16", "amx", "cap", "fast"),
    [
        (True, True, False, "", True),  # Zen 4, Cooper Lake: AVX512-BF16
        (True, False, True, "", True),  # Sapphire Rapids: AMX
        (True, False, False, "", False),  # Cascade Lake / Ice Lake: oneDNN emulates bf16
        (False, False, False, "", False),  # AVX2 only: torch says no bf16 at all
        (True, True, False, "AVX512_CORE", False),  # oneDNN told not to use the instructions
        (True, True, False, "avx2", False),
        (True, True, True, "AVX512_CORE_AMX", True),  # a cap above bf16 changes nothing
    ],
    ids=[
        "avx512-bf16",
        "amx",
        "avx512-no-bf16",
        "avx2",
        "capped-avx512",
        "capped-avx2",
        "capped-amx",
    ],  # fmt: skip
)
def test_fast_bf16_needs_the_instructions_not_only_onednns_word(
    monkeypatch, onednn_bf16, avx512_bf16, amx, cap, fast
):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    assert runtime.cpu_supports_fast_bf16() is fast
    assert runtime.resolve_precision("auto") == ("bf16" if fast else "no")


@pytest.mark.parametrize("arm_bf16", [True, False])
def test_on_arm_torchs_check_is_the_instructions_and_stands(monkeypatch, arm_bf16):
    # torch asks cpuinfo for the ARM bf16 instructions there: no emulation to rule out
    monkeypatch.setattr(runtime.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: arm_bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert runtime.cpu_supports_fast_bf16() is arm_bf16


def test_the_older_name_of_the_cap_counts_too(monkeypatch):
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert not runtime.cpu_supports_fast_bf16()


def test_a_real_process_with_onednn_capped_at_plain_avx512_runs_fp32():
    """The real check, in a process whose oneDNN cannot use bf16 instructions: torch's own
    bf16 check still says yes there (oneDNN emulates bf16 on AVX-512), and auto picks fp32."""
    code = (
        "import torch; from rlhf.infra import runtime; "
        "print(bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "
        "runtime.resolve_precision('auto'))"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    assert out[1] == "no"
    if not torch.cpu._is_avx512_supported():
        pytest.skip("no AVX-512 here: torch's own check is false anyway, nothing more to see")
    assert out[0] == "True"
