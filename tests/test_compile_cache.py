"""The persistent compilation cache of the commands (compile_cache.py)."""

import os
import pathlib
import subprocess
import sys

from astraea_jax import compile_cache

# A fresh process: the cache is read at the first compile of a process.
WORKER = """
import sys, time
import jax, jax.numpy as jnp
from astraea_jax import compile_cache
compile_cache.enable()
f = jax.jit(lambda x: jnp.cumsum(jnp.sin(x) @ x.T, axis=0))
f(jnp.ones((64, 64))).block_until_ready()
"""


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "c"))
  assert compile_cache.cache_dir() == tmp_path / "c"
  monkeypatch.setenv(compile_cache.ENV, "off")
  assert compile_cache.cache_dir() is None
  assert compile_cache.enable() is None
  monkeypatch.delenv(compile_cache.ENV)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
  assert compile_cache.cache_dir() == tmp_path / "x" / "astraea-jax" / "xla"


def test_a_second_process_reuses_the_compiled_program(tmp_path):
  env = {**os.environ, compile_cache.ENV: str(tmp_path / "cache"),
         "PYTHONPATH": str(pathlib.Path(__file__).parents[1])}
  subprocess.run([sys.executable, "-c", WORKER], env=env, check=True)
  entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
  assert entries, "the first process wrote no cache entry"
  mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
  subprocess.run([sys.executable, "-c", WORKER], env=env, check=True)
  # the same program: read back, nothing new compiled and written
  assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == entries
  assert {p: p.stat().st_mtime_ns
          for p in (tmp_path / "cache").iterdir()} == mtimes


def test_an_unwritable_folder_only_warns(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("")
  assert compile_cache.enable(blocker / "cache") is None
  assert compile_cache.ENV in capsys.readouterr().err
