"""The process and its operating system: allocator, compilation cache, freed memory.

Every execution of a compiled step allocates its temporary buffers afresh: for
MoCE-IR-S's training step on CPU one block of 7.9 GB. glibc serves a block that
large with a fresh ``mmap`` and unmaps it when freed, so every step the kernel
zero-fills the whole of it again on first touch (1.9 million page faults and
4.5 s of kernel time in a 6.3 s step). Two remedies, chosen when the process
starts (the allocator is fixed before Python runs):

* a caching allocator, tcmalloc (gperftools' ``libtcmalloc_minimal``, e.g.
  Debian's ``libtcmalloc-minimal4``), preloaded when the system has it: it
  keeps freed blocks mapped and hands the same pages out again, so a step
  faults nothing. Measured on a 2-core Xeon: MoCE-IR-S 4x128² step 4.17 ->
  3.74 s, MoCE-IR 7.57 -> 6.42 s, the demo's 0.36 -> 0.31 s, the same resident
  memory as glibc's;
* otherwise glibc's tunable ``glibc.malloc.hugetlb=1``, which backs those maps
  with transparent huge pages: 512x fewer faults, yet still zero-filled each
  step (the S step: 1.1 s of kernel time instead of 4.5).

The entry points call :func:`reexec_with_fast_allocator` first thing, which
restarts the process once with the better of the two. Set
``MOCEIR_KEEP_ALLOCATOR=1`` to opt out (a user's own ``LD_PRELOAD`` of an
allocator is kept as it is). jemalloc did as well as tcmalloc on speed but held
0.6-1 GB more, so it is not picked.

Compiling a training step takes 40 s (demo) to over 2 min (MoCE-IR) on a 2-core
CPU, and a resumed run, a second evaluation or another ``restore`` of the same
sizes compiles the same programs again. :func:`use_compilation_cache` points
JAX's persistent cache at a folder of this user's cache keyed by the CPU (XLA:CPU
code is built for the CPU it runs on, and a home directory may be shared by
machines that differ), unless the user chose a folder (``JAX_COMPILATION_CACHE_DIR``)
or opted out (``MOCEIR_COMPILATION_CACHE=0``).

Compiling holds gigabytes of small allocations (MoCE-IR-S train step: 3.0 GB
peak) that the allocator keeps after they are freed, so the buffers of the
first run come on top: 3.2 + 1.1 GB with ``scan_blocks`` and ``remat``.
Compiling ahead and calling :func:`release_free_memory` before the first run
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
PRELOAD_LIBRARY = "tcmalloc_minimal"  # gperftools' allocator without the profilers
OPT_OUT = "MOCEIR_KEEP_ALLOCATOR"
MARK = "MOCEIR_ALLOCATOR"  # set in the restarted process: what it chose; never restart twice
CACHE_SWITCH = "MOCEIR_COMPILATION_CACHE"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"
# tcmalloc reports every allocation above 1 GB on stderr; a step's temporaries are larger.
_TCMALLOC_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 42)}


def huge_page_env(environ=None, thp_path: str = _THP) -> dict | None:
  """The environment with glibc's huge-page tunable added, or None when there is nothing to gain."""
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


def _preloaded_allocator(environ) -> str | None:
  """The allocator library in ``LD_PRELOAD`` (the user's own, or the restart's), or None."""
  entries = environ.get("LD_PRELOAD", "").replace(":", " ").split()
  return next((e for e in entries if "malloc" in e), None)


def allocator_env(environ=None, thp_path: str = _THP,
                  find_library=ctypes.util.find_library) -> dict | None:
  """The environment to restart with (tcmalloc preloaded, else huge pages), or None."""
  environ = dict(os.environ if environ is None else environ)
  if environ.get(OPT_OUT) or environ.get(MARK) or not sys.platform.startswith("linux"):
    return None
  if _preloaded_allocator(environ):  # the user's own allocator
    return None
  lib = find_library(PRELOAD_LIBRARY) if platform.libc_ver()[0] == "glibc" else None
  if lib:
    environ["LD_PRELOAD"] = " ".join(p for p in (environ.get("LD_PRELOAD", ""), lib) if p)
    for key, value in _TCMALLOC_QUIET.items():
      environ.setdefault(key, value)
    environ[MARK] = lib
    return environ
  env = huge_page_env(environ, thp_path)
  if env is not None:
    env[MARK] = TUNABLE
  return env


def reexec_with_fast_allocator() -> None:
  """Restart this Python process with :func:`allocator_env`, if that helps (Linux/glibc)."""
  env = allocator_env()
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


def allocator_in_use(environ=None) -> str:
  """What :func:`reexec_with_fast_allocator` chose for this process, for the logs."""
  environ = os.environ if environ is None else environ
  lib = _preloaded_allocator(environ)
  if "tcmalloc" in environ.get(MARK, "") or "tcmalloc" in (lib or ""):
    return "tcmalloc"
  if lib:  # the user's own choice, which the restart keeps
    return f"preloaded {os.path.basename(lib)}"
  name = ("glibc with huge pages" if TUNABLE in environ.get("GLIBC_TUNABLES", "")
          else "system malloc")
  if environ.get(OPT_OUT):
    return name
  return name + " (installing tcmalloc, e.g. libtcmalloc-minimal4, makes steps 10-20% faster)"


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
  """Return the allocator's free pages to the OS; False where there is no way to.

  tcmalloc (when preloaded) releases its free spans; glibc's ``malloc_trim``
  returns the heap's free pages (a no-op for blocks tcmalloc serves).
  """
  done = False
  try:
    release = ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory
  except (OSError, AttributeError):
    release = None
  if release is not None:
    release.argtypes, release.restype = [], None
    release()
    done = True
  if platform.libc_ver()[0] != "glibc":
    return done
  try:
    trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
  except (OSError, AttributeError):
    return done
  trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
  trim(0)
  return True
