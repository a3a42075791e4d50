"""The allocator restart (tcmalloc or huge pages): when it applies, that it never loops, that it
really restarts; the compilation cache; handing freed memory back."""

import ctypes.util
import os
import platform
import subprocess
import sys

import pytest

from moceir_jax import host


@pytest.fixture
def thp(tmp_path):
  def make(mode):
    p = tmp_path / "enabled"
    p.write_text({"madvise": "always [madvise] never\n", "never": "always madvise [never]\n"}[mode])
    return str(p)
  return make


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_env_adds_the_tunable_and_keeps_the_users(thp):
  env = host.huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp("madvise"))
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + host.TUNABLE
  assert host.huge_page_env({}, thp("madvise"))["GLIBC_TUNABLES"] == host.TUNABLE


def test_env_is_none_when_nothing_to_gain_or_already_set(thp, tmp_path):
  assert host.huge_page_env({"GLIBC_TUNABLES": host.TUNABLE}, thp("madvise")) is None
  assert host.huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, thp("madvise")) is None
  assert host.huge_page_env({}, thp("never")) is None
  assert host.huge_page_env({}, str(tmp_path / "missing")) is None
  assert host.huge_page_env({host.OPT_OUT: "1"}, thp("madvise")) is None


def _no_tcmalloc(name):
  return None


def _tcmalloc(name):
  return "libtcmalloc_minimal.so.4" if name == host.PRELOAD_LIBRARY else None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_allocator_env_prefers_tcmalloc_then_huge_pages(thp):
  env = host.allocator_env({"LD_PRELOAD": "libfoo.so"}, thp("madvise"), _tcmalloc)
  assert env["LD_PRELOAD"] == "libfoo.so libtcmalloc_minimal.so.4"
  assert env[host.MARK] == "libtcmalloc_minimal.so.4"
  assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) > 1 << 40  # no report per step
  assert "GLIBC_TUNABLES" not in env
  env = host.allocator_env({}, thp("madvise"), _no_tcmalloc)
  assert env["GLIBC_TUNABLES"] == host.TUNABLE and env[host.MARK] == host.TUNABLE
  assert host.allocator_env({}, thp("never"), _no_tcmalloc) is None


def test_allocator_env_never_restarts_twice_and_keeps_the_users_choice(thp):
  assert host.allocator_env({host.MARK: "x"}, thp("madvise"), _tcmalloc) is None
  assert host.allocator_env({host.OPT_OUT: "1"}, thp("madvise"), _tcmalloc) is None
  assert host.allocator_env({"LD_PRELOAD": "/opt/libjemalloc.so.2"}, thp("madvise"),
                            _tcmalloc) is None


def test_allocator_in_use_names_the_choice_and_hints_at_tcmalloc():
  assert host.allocator_in_use({host.MARK: "libtcmalloc_minimal.so.4"}) == "tcmalloc"
  named = host.allocator_in_use({host.MARK: host.TUNABLE, "GLIBC_TUNABLES": host.TUNABLE})
  assert named.startswith("glibc with huge pages") and "libtcmalloc-minimal4" in named
  assert host.allocator_in_use({host.OPT_OUT: "1"}) == "system malloc"
  # preloaded by the user rather than by the restart
  assert host.allocator_in_use({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}) == "tcmalloc"
  assert host.allocator_in_use({"LD_PRELOAD": "libfoo.so:/opt/libjemalloc.so.2"}) == (
      "preloaded libjemalloc.so.2")


def _run_entry(tmp_path, env, *args):
  script = tmp_path / "entry.py"
  script.write_text(
      "import os, sys\n"
      "from moceir_jax import host\n"
      "print('start', flush=True)\n"
      "if __name__ == '__main__':\n"
      "  host.reexec_with_fast_allocator()\n"
      "maps = open('/proc/self/maps').read()\n"
      "print(os.environ.get(host.MARK), 'tcmalloc' in maps, sys.argv[1:])\n")
  env = dict(env, PYTHONPATH=os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")]))
  return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                        text=True, check=True).stdout.splitlines()


_CLEAN = {k: v for k, v in os.environ.items()
          if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", host.OPT_OUT, host.MARK)}


@pytest.mark.skipif(host.allocator_env(_CLEAN) is None, reason="nothing to restart with here")
def test_entry_point_restarts_once_with_the_allocator(tmp_path):
  chosen = host.allocator_env(_CLEAN)[host.MARK]
  out = _run_entry(tmp_path, _CLEAN, "--flag=1", "x")
  # Restarted exactly once, arguments kept, and a preloaded tcmalloc really is in the process.
  assert out == ["start", "start", f"{chosen} {'tcmalloc' in chosen} ['--flag=1', 'x']"]
  out = _run_entry(tmp_path, dict(_CLEAN, **{host.OPT_OUT: "1"}))
  assert out == ["start", "None False []"]


def test_compilation_cache_dir_is_per_cpu_and_respects_the_user(tmp_path):
  folder = host.compilation_cache_dir({"XDG_CACHE_HOME": str(tmp_path)})
  assert os.path.dirname(folder) == str(tmp_path / "moceir_jax")
  assert os.path.basename(folder).startswith("xla-")
  assert folder == host.compilation_cache_dir({"XDG_CACHE_HOME": str(tmp_path)})  # stable
  assert host.compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/mine"}) is None
  assert host.compilation_cache_dir({host.CACHE_SWITCH: "0"}) is None


def test_entry_point_reuses_compiled_programs(tmp_path):
  script = tmp_path / "entry.py"
  script.write_text(
      "from moceir_jax import host\n"
      "host.use_compilation_cache()\n"
      "import jax, jax.numpy as jnp\n"
      "print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).sum()))\n")
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COMPILATION_CACHE_DIR", host.CACHE_SWITCH)}
  env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), JAX_PLATFORMS="cpu",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             PYTHONPATH=os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")]))
  folder = host.compilation_cache_dir(env)

  def run():
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, check=True).stdout
    return out, sorted(os.listdir(folder))

  out1, entries1 = run()
  assert entries1  # the compiled program was stored under this CPU's folder
  out2, entries2 = run()
  assert (out2, entries2) == (out1, entries1)  # same result, found in the cache, nothing added


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
@pytest.mark.parametrize("allocator", ["glibc", "tcmalloc"])
def test_release_free_memory_returns_a_fragmented_heap(tmp_path, allocator):
  # In a fresh process: 200 MB of small blocks, all freed but every 64th, which pins the heap
  # so that free() alone cannot shrink it; the trim must give most of it back.
  code = (
      "from moceir_jax import host\n"
      "blocks = [bytearray(2000) for _ in range(100_000)]\n"
      "keep = blocks[::64]\n"
      "del blocks\n"
      "before = host.resident_bytes()\n"
      "assert host.release_free_memory()\n"
      "print(before - host.resident_bytes())\n")
  env = dict(_CLEAN)
  if allocator == "tcmalloc":
    lib = ctypes.util.find_library(host.PRELOAD_LIBRARY)
    if not lib:
      pytest.skip("no tcmalloc on this machine")
    env["LD_PRELOAD"] = lib
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  released = int(out.stdout.split()[-1])
  assert released > 100e6, released
