"""The `astraea` command line: demo end to end, unfinished commands, options."""

import json
import subprocess
import sys

import numpy as np
import pytest

from astraea_jax import cli
from converters.safetensors_io import SafetensorsFile


def test_demo_with_the_packaged_weights(tmp_path, capsys):
  """`astraea demo` as the README runs it (3 steps to keep CI short). The
  package ships the weights, so their absence fails here (it used to pass
  on the "how to train" message; that message has its own test below).
  The full check of the demo's outputs is
  tests/test_demo_model.py::test_demo_end_to_end."""
  from astraea_jax.demo_model import model as demo_model
  out = tmp_path / "demo"
  assert (demo_model.WEIGHTS_DIR / demo_model.WEIGHTS_FILE).is_file(), (
      f"the package must ship the demo weights in {demo_model.WEIGHTS_DIR}")
  code = cli.main(["demo", "--steps", "3", "--out", str(out), "--quiet"])
  captured = capsys.readouterr()
  assert code == 0 and "PSNR" in captured.out
  report = json.loads((out / "report.json").read_text())
  assert report["tokens_per_step"] == [1152, 346, 230]  # [1.0, 0.3, 0.2]
  assert np.isfinite(report["psnr_db"]) and 0 < report["ssim"] <= 1
  assert all((out / name).is_file() for name in report["files"])


def test_demo_without_weights_says_how_to_train(tmp_path, capsys):
  assert cli.main(["demo", "--weights", str(tmp_path / "none"),
                   "--out", str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  assert "no demo model weights" in err and "astraea train-demo" in err


def test_unknown_options_are_rejected(capsys):
  with pytest.raises(SystemExit):
    cli.main(["convert", "a", "b", "--no-such-option"])
  assert "unrecognized arguments" in capsys.readouterr().err


def test_console_script_entry_point():
  out = subprocess.run([sys.executable, "-m", "astraea_jax.cli", "--help"],
                       capture_output=True, text=True, check=True).stdout
  for command in ("demo", "train-demo", "generate", "convert", "search",
                  "eval"):
    assert command in out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  from astraea_jax import testing
  from astraea_jax.configs import WanConfig
  config = WanConfig.tiny(num_layers=2, dim=64, ffn_dim=96, num_heads=2,
                          text_dim=24, text_len=8, freq_dim=16)
  root = tmp_path_factory.mktemp("gen")
  src = testing.write_wan_checkpoint(root / "src", config, seed=1)
  assert cli.main(["convert", str(src), str(root / "ckpt"), "--quiet"]) == 0
  from converters.safetensors_io import save_file
  rng = np.random.default_rng(0)
  save_file({"context": rng.standard_normal((5, 24)).astype(np.float32)},
            root / "emb.safetensors")
  return root


GEN = ["--height", "32", "--width", "48", "--frames", "5", "--steps", "3"]


def test_generate_compare(converted, tmp_path, capsys):
  out = tmp_path / "out"
  assert cli.main(["generate", str(converted / "ckpt"), "--text-embeddings",
                   str(converted / "emb.safetensors"), "--out", str(out),
                   "--budget", "0.5", "--compare", *GEN]) == 0
  assert "speedup" in capsys.readouterr().out
  report = json.loads((out / "report.json").read_text())
  assert report["astraea"]["schedule"] == [1.0, 0.3, 0.2]
  assert report["compared_on"] == "latents" and np.isfinite(report["psnr_db"])
  f = SafetensorsFile(out / "outputs.safetensors")
  assert f.shape("latents_full") == f.shape("latents_astraea") == (
      1, 16, 2, 4, 6)
  assert not np.array_equal(f.get("latents_full"), f.get("latents_astraea"))


def test_generate_with_the_compact_state(converted, tmp_path, capsys):
  """--cache-dtype reaches the sampler, report.json and the printed
  summary (the config's state is not dumped as a raw object: that was a
  crash)."""
  runs = {}
  for name, extra in (("default", []), ("compact", ["--cache-dtype",
                                                     "float8"])):
    out = tmp_path / name
    assert cli.main(["generate", str(converted / "ckpt"), "--text-embeddings",
                     str(converted / "emb.safetensors"), "--out", str(out),
                     "--budget", "0.5", *GEN, *extra]) == 0
    runs[name] = json.loads((out / "report.json").read_text())["astraea"]
  printed = capsys.readouterr().out
  assert "float8 updates, Delta sketch 64" in printed
  assert (runs["default"]["cache_dtype"], runs["compact"]["cache_dtype"]) == (
      "bfloat16", "float8")
  assert runs["compact"]["delta_sketch"] == 64


@pytest.mark.parametrize("extra,message", [
    (["--schedule", "SCHED"], "has 2 budgets but --steps is 3"),
    (["--height", "36"], "multiples of 16"),
    (["--text-embeddings", "BADEMB"], "no tensor named 'context'"),
])
def test_generate_bad_input(converted, tmp_path, capsys, extra, message):
  (tmp_path / "s.json").write_text(json.dumps({"schedule": [1.0, 0.5]}))
  from converters.safetensors_io import save_file
  save_file({"ctx": np.zeros((2, 24), np.float32)}, tmp_path / "bad.st")
  extra = [e.replace("SCHED", str(tmp_path / "s.json"))
           .replace("BADEMB", str(tmp_path / "bad.st")) for e in extra]
  out = tmp_path / "out"
  args = ["generate", str(converted / "ckpt"), "--text-embeddings",
          str(converted / "emb.safetensors"), "--out", str(out), *GEN, *extra]
  assert cli.main(args) == 1
  assert message in capsys.readouterr().err
  assert not out.exists()


def test_generate_budget_out_of_range(converted, tmp_path, capsys):
  """Refused while the command line is read, naming the flag and range."""
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["generate", str(converted / "ckpt"), "--text-embeddings",
              str(converted / "emb.safetensors"), "--out",
              str(tmp_path / "out"), *GEN, "--budget", "1.5"])
  assert exit_info.value.code == 2
  assert "argument --budget: 1.5 is out of range: must be in (0, 1]" in \
      capsys.readouterr().err
  assert not (tmp_path / "out").exists()
