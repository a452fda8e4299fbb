"""Keeping freed host memory (sodp3d.runs.keep_host_memory): reused, never grown."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's allocator only")

# Allocates and frees two 128 MB tensors many times, as training steps do, and prints the
# resident memory (MB) before, after the first few and after all of them.
CHILD = r"""
import resource, sys, torch
from sodp3d.runs import keep_host_memory
assert keep_host_memory() and keep_host_memory()   # idempotent
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
def step():
    x = torch.ones(32 * 2**20)          # 128 MB, written
    y = (x * 2).relu_()
    return float(y[::4096].sum())
base = rss_mb()
for _ in range(60):                     # the heap settles within some tens of steps
    step()
early = rss_mb()
for _ in range(100):
    step()
print(base, early, rss_mb())
"""


def test_freed_memory_is_reused_and_resident_memory_does_not_grow():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    base, early, late = map(float, out.stdout.split())
    assert early - base > 200  # the two 128 MB blocks stay resident between steps: reused, not re-faulted
    assert late - early < 16, (early, late)  # 100 more steps add nothing
