"""The process and its operating system: huge pages, compilation cache, freed memory.

Every execution of a compiled step allocates its temporary buffers afresh, and
glibc serves allocations that large with a fresh ``mmap`` whose 4 KiB pages the
kernel zero-fills on first touch. For the demo model's training step on CPU that
was ~370,000 page faults and 1.2 s of kernel time in a 1.7 s step. glibc's
tunable ``glibc.malloc.hugetlb=1`` backs those maps with transparent huge pages
(512x fewer faults); measured: 1.74 -> 1.42 s per step, the same results. glibc
reads tunables only when a process starts, so the entry points call
:func:`reexec_with_huge_pages` first thing, which restarts the process once
with the tunable set. Set ``MOCEIR_KEEP_ALLOCATOR=1`` to opt out.

Compiling a training step takes 40 s (demo) to over 2 min (MoCE-IR) on a 2-core
CPU, and a resumed run, a second evaluation or another ``restore`` of the same
sizes compiles the same programs again. :func:`use_compilation_cache` points
JAX's persistent cache at a folder of this user's cache keyed by the CPU (XLA:CPU
code is built for the CPU it runs on, and a home directory may be shared by
machines that differ), unless the user chose a folder (``JAX_COMPILATION_CACHE_DIR``)
or opted out (``MOCEIR_COMPILATION_CACHE=0``).

Compiling holds gigabytes of small allocations (MoCE-IR-S train step: 3.0 GB
peak) that glibc keeps after they are freed, so the buffers of the first run
come on top: 3.2 + 1.1 GB with ``scan_blocks`` and ``remat``. Compiling ahead
and calling :func:`release_free_memory` (``malloc_trim``) before the first run
hands 1.7 GB back, and the process peaks at the compiler's 3.0 GB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "MOCEIR_KEEP_ALLOCATOR"
CACHE_SWITCH = "MOCEIR_COMPILATION_CACHE"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_page_env(environ=None, thp_path: str = _THP) -> dict | None:
  """The environment to restart with, or None when there is nothing to gain."""
  environ = dict(os.environ if environ is None else environ)
  if environ.get(OPT_OUT) or not sys.platform.startswith("linux"):
    return None
  if platform.libc_ver()[0] != "glibc":
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:  # already set (by us or by the user): never loop
    return None
  try:
    with open(thp_path, encoding="ascii") as f:
      if "[never]" in f.read():
        return None
  except OSError:
    return None
  environ["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, TUNABLE) if t)
  return environ


def reexec_with_huge_pages() -> None:
  """Restart this Python process with :data:`TUNABLE` set, if that helps (Linux/glibc)."""
  env = huge_page_env()
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


def cache_root(override: str | None = None, environ=None) -> str:
  """``override``, else ``$XDG_CACHE_HOME/moceir_jax`` or ``~/.cache/moceir_jax``."""
  environ = os.environ if environ is None else environ
  return override or os.path.join(
      environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
      "moceir_jax")


def cpu_signature() -> str:
  """What code compiled for this CPU depends on: it may not run on another."""
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      lines = [l for l in f if l.startswith(("flags", "model name", "Features", "CPU part"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor() + platform.machine()


def compilation_cache_dir(environ=None) -> str | None:
  """The folder for compiled programs, or None to leave JAX's setting alone."""
  environ = os.environ if environ is None else environ
  if environ.get("JAX_COMPILATION_CACHE_DIR") or environ.get(CACHE_SWITCH, "1") == "0":
    return None
  key = hashlib.sha256((cpu_signature() + platform.machine()).encode()).hexdigest()[:12]
  return os.path.join(cache_root(environ=environ), f"xla-{key}")


def use_compilation_cache() -> None:
  """Persist compiled programs across runs (before JAX is imported; see the module doc)."""
  folder = compilation_cache_dir()
  if folder:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder


def resident_bytes() -> int | None:
  """This process's resident memory now (Linux), or None."""
  try:
    with open("/proc/self/statm", encoding="ascii") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return None


def release_free_memory() -> bool:
  """Return the heap's free pages to the OS (glibc ``malloc_trim``); False where unavailable."""
  if platform.libc_ver()[0] != "glibc":
    return False
  try:
    trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
  except (OSError, AttributeError):
    return False
  trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
  trim(0)
  return True
