import os

import pytest

from astraea_jax import compile_cache
from astraea_jax.testing import fixtures_dir


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs a GPU (skipped on CPU)")


@pytest.fixture(scope="session")
def fixtures():
  path = fixtures_dir()
  if not path.exists():
    raise FileNotFoundError(
        f"parity fixtures not found at {path}; set ASTRAEA_FIXTURES")
  return path


# The commands turn on a persistent compilation cache in the user's cache
# folder; the suite keeps it off (tests/test_compile_cache.py tests it).
os.environ.setdefault(compile_cache.ENV, "off")
