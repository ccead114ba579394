"""Process-level CPU settings (blindsr.device)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = """
import ctypes
from blindsr.device import freed_memory_kept
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
def freed_bytes_returned():  # a 256 MB block (over glibc's 32 MiB mmap threshold), touched, then freed
    p = libc.malloc(ctypes.c_size_t(256 << 20)); ctypes.memset(p, 1, 256 << 20); before = rss()
    libc.free(ctypes.c_void_p(p))
    return before - rss()
with freed_memory_kept() as applied:
    if applied:  # the freed block stays in the heap for reuse
        assert freed_bytes_returned() < 16 << 20
assert freed_bytes_returned() > 200 << 20  # glibc's defaults again: the block is unmapped on free
print(applied)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
@pytest.mark.parametrize(("env", "want"), [({}, "True"), ({"BLINDSR_MALLOC": "default"}, "False")])
def test_freed_memory_kept_only_inside_the_block(env, want):
    import os

    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env={**os.environ, **env},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want
