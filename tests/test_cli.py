"""The `astraea` command line: demo end to end, unfinished commands, options."""

import json
import subprocess
import sys

import numpy as np
import pytest

from astraea_jax import cli
from converters.safetensors_io import SafetensorsFile


def test_demo_runs_end_to_end(tmp_path, capsys):
  out = tmp_path / "demo"
  assert cli.main(["demo", "--steps", "3", "--out", str(out)]) == 0
  assert "tiny RANDOM" in capsys.readouterr().out
  report = json.loads((out / "report.json").read_text())
  assert report["tokens_per_step"][0] == report["tokens"] == 80
  assert report["tokens_per_step"][1] < 80
  assert np.isfinite(report["psnr_db"]) and 0 < report["ssim"] <= 1
  f = SafetensorsFile(out / "outputs.safetensors")
  assert f.shape("video_full") == (1, 3, 17, 64, 64)
  video = f.get("video_full")
  assert video.min() >= -1 and video.max() <= 1 and video.std() > 0


@pytest.mark.parametrize("command", ["search", "bench"])
def test_unfinished_commands_say_so(command, capsys):
  assert cli.main([command]) == 2
  assert "not available yet" in capsys.readouterr().err


def test_unknown_options_are_rejected(capsys):
  with pytest.raises(SystemExit):
    cli.main(["convert", "a", "b", "--no-such-option"])
  assert "unrecognized arguments" in capsys.readouterr().err


def test_console_script_entry_point():
  out = subprocess.run([sys.executable, "-m", "astraea_jax.cli", "--help"],
                       capture_output=True, text=True, check=True).stdout
  for command in ("demo", "generate", "convert", "search", "bench"):
    assert command in out
