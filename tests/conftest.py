import pytest

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
