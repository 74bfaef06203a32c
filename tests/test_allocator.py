"""selfrepair.allocator: freed memory is kept for the next tensor (glibc), so a pass that allocates
and frees large tensors does not fault every page in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from selfrepair.allocator import keep_freed_memory

# A forward-like loop in a fresh process: each step makes two 40 MiB activations (above glibc's largest
# mmap threshold, 32 MiB) and frees them at the next; prints the page faults of the last ten steps and
# the pages those steps' activations span.
PROBE = """
import resource, sys, torch
from selfrepair.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
x, w = torch.randn(4096, 64), torch.randn(64, 2560)
for i in range(20):
    if i == 10:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    h = torch.relu(x @ w)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, 10 * h.numel() * 4 // resource.getpagesize())
"""


def _faults(mode: str) -> tuple[bool, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    kept, faults, pages = out.stdout.split()
    return kept == "True", int(faults), int(pages)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_a_freed_large_tensor_is_reused_without_page_faults():
    assert keep_freed_memory() and keep_freed_memory()  # once per process; later calls say the same
    kept, faults, pages = _faults("keep")
    default = _faults("default")
    if default[1] <= pages // 2:  # transparent huge pages, another allocator: nothing to compare
        pytest.skip(f"the default path faults little here ({default[1]} faults for {pages} pages)")
    assert kept and faults < pages // 10, f"kept: {faults} page faults for {pages} pages allocated again"
