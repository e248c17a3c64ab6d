"""glibc malloc settings for steps whose XLA temporaries are large (CPU training and benchmarks).

XLA:CPU allocates each execution's temporaries as one buffer (2.4 GiB for the ``small`` preset at 8 x 256) and
frees it when the execution ends. glibc serves any allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap``, so every step page-faults that whole buffer in again: measured on the
2-core CI machine, ~690K minor faults and ~1.6 CPU-seconds of system time per step, ~0.7 s of a 5.6 s step.

``SETTINGS`` turns that off: one arena (so worker threads allocate from the main heap), no mmap for large blocks,
and no trimming of the heap top, so the temporaries' pages stay mapped and are reused from step to step. The cost
is that freed memory is kept by the process (resident memory stays at its high-water mark), which is what a
training process wants anyway. These are environment variables read once when the process starts, so
``reexec_with_malloc_settings`` restarts the current program with them (nothing else is changed); it must be
called before any work is done.
"""
from __future__ import annotations

import os
import platform
import sys

SETTINGS = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 46)}


def applies() -> bool:
  """True on Linux with glibc (the variables mean nothing to other C libraries)."""
  return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def active() -> bool:
  return all(os.environ.get(k) == v for k, v in SETTINGS.items())


def reexec_with_malloc_settings(argv: list[str] | None = None) -> None:
  """Restart this Python program with ``SETTINGS`` in its environment, unless they are already there (or the C
  library is not glibc). Never returns when it restarts."""
  if not applies() or active():
    return
  argv = list(sys.argv if argv is None else argv)
  env = dict(os.environ, **SETTINGS)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + argv, env)
