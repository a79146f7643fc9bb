"""rlhf.infra.allocator: memory a step frees stays mapped for the next one (glibc only)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's; elsewhere keep_freed_memory is a no-op",
)

# Writes and frees a 48 MB tensor (the size of a (8, 32, 49152) fp32 logits buffer) and
# prints how many of its 4 KiB pages left the process's resident set when it was freed.
SCRIPT = """
import os, sys, torch
from rlhf.accel.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def resident_pages():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 4096
x = torch.ones(12 << 20)
before = resident_pages()
del x
print(before - resident_pages())
"""


def pages_given_back(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def test_a_freed_block_stays_mapped_for_the_next_allocation():
    pages = (48 << 20) // 4096
    # glibc's default maps a block this big on its own and unmaps it on free; the next one
    # is mapped and faulted in afresh
    assert pages_given_back("default") > 0.9 * pages
    assert pages_given_back("keep") < 0.1 * pages  # kept in the heap for reuse
