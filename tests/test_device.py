"""Process-level CPU settings (blindsr.device)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = """
import ctypes, os
from blindsr.device import keep_freed_memory
applied = keep_freed_memory()
if applied:  # a block over glibc's 32 MiB mmap threshold now comes from the heap: freeing it keeps the memory
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    def rss():
        return int(open("/proc/self/statm").read().split()[1])
    p = libc.malloc(ctypes.c_size_t(256 << 20)); ctypes.memset(p, 1, 256 << 20); before = rss()
    libc.free(ctypes.c_void_p(p)); assert before - rss() < 16 << 20 >> 12, (before, rss())
print(applied)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
@pytest.mark.parametrize(("env", "want"), [({}, "True"), ({"BLINDSR_MALLOC": "default"}, "False")])
def test_keep_freed_memory(env, want):
    import os

    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env={**os.environ, **env},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want
