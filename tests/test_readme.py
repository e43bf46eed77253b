"""README.md's Python snippets run exactly as written.

Every fenced ```python block runs in a fresh namespace, except those whose
first line says what they need that CI lacks (`# needs: ...`: converted
checkpoints of real models, 8 devices); those must say so in that line.
"""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(),
                    flags=re.S | re.M)
RUNNABLE = [b for b in BLOCKS if not b.startswith("# needs: ")]


def test_readme_has_runnable_snippets():
  """The extraction found the README's snippets, and at least the sampling
  example runs (a README change that drops every runnable block fails)."""
  assert len(BLOCKS) >= 4 and len(RUNNABLE) >= 1


@pytest.mark.parametrize("block", RUNNABLE,
                         ids=[f"block{i}" for i in range(len(RUNNABLE))])
def test_snippet_runs_as_written(block, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a snippet that writes, writes here
  namespace = {"__name__": "__readme__"}
  exec(compile(block, str(README), "exec"), namespace)  # pylint: disable=exec-used
  # The sampling snippet's results: latents of the requested shape.
  if "fast" in namespace:
    assert namespace["fast"].shape == namespace["full"].shape
    assert namespace["fast"].shape == namespace["noise"].shape
