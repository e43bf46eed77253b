"""The command line against a tired user's mistakes (issue #20).

Each case runs `astraea ...` as its own process, in a temporary folder
holding tiny checkpoints (a Wan2.1 download as published, its conversion,
a damaged conversion, a folder and a file of the user's), and asserts:
a non-zero exit, a message naming the problem, no Python traceback, and
every file in the folder byte-identical afterwards (nothing read was
touched, nothing was written). The processes run a few at a time; their
results are collected once per module.
"""

import concurrent.futures
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from astraea_jax import cli, testing
from astraea_jax.commands import common
from astraea_jax.configs import WanConfig
from astraea_jax.demo_model import model as demo_model
from converters.safetensors_io import save_file

GEN = ["--height", "32", "--width", "48", "--frames", "5", "--steps", "3"]
EMB = ["--text-embeddings", "emb.safetensors"]

# (id, argv, exit code, words the message must hold)
CASES = [
    # Data loss: a destination that is, contains or lies in the source.
    ("convert-onto-source", ["convert", "src", "src", "--overwrite"], 1,
     ["DST src is the input SRC src"]),
    ("convert-onto-parent", ["convert", "parent/src", "parent",
                             "--overwrite"], 1,
     ["DST parent contains the input SRC parent/src"]),
    ("convert-into-source", ["convert", "src", "src/converted"], 1,
     ["lies inside the input SRC src"]),
    ("convert-over-foreign-folder", ["convert", "src", "mine",
                                     "--overwrite"], 1,
     ["mine exists and is not an astraea-jax output"]),
    ("convert-over-a-file", ["convert", "src", "notes.txt",
                             "--overwrite"], 1, ["notes.txt is a file"]),
    ("convert-existing-output", ["convert", "src", "ckpt"], 1,
     ["already exists (an earlier astraea-jax output); pass --overwrite"]),
    ("convert-missing-source", ["convert", "nothere", "out"], 1,
     ["nothere: no such folder"]),
    ("convert-bad-text-len", ["convert", "src", "out", "--text-len", "0"], 2,
     ["argument --text-len: 0 is out of range: must be >= 1"]),
    # Reading what is not a converted checkpoint.
    ("generate-unconverted", ["generate", "src", *EMB, "--out", "o"], 1,
     ["src is a model as published", "astraea convert src DST"]),
    ("generate-demo-weights", ["generate", "DEMO", *EMB, "--out", "o"], 1,
     ["the demo model's weights folder"]),
    ("generate-missing-model", ["generate", "nothere", *EMB, "--out",
                                "cat.mp4"], 1, ["nothere: no such folder"]),
    ("generate-model-is-a-file", ["generate", "notes.txt", *EMB, "--out",
                                  "o"], 1, ["notes.txt is a file"]),
    ("generate-damaged", ["generate", "ckpt_bad", *EMB, "--out", "o", *GEN],
     1, ["ckpt_bad: the converted checkpoint is damaged",
         "astraea convert SRC"]),
    # Outputs.
    ("generate-into-model", ["generate", "ckpt", *EMB, "--out",
                             "ckpt/cat.mp4", "--vae", "ckpt"], 1,
     ["lies inside the input --model ckpt"]),
    ("generate-over-foreign-folder", ["generate", "ckpt", *EMB, "--out",
                                      "mine", "--overwrite", *GEN], 1,
     ["--out mine exists and is not an astraea-jax output"]),
    ("generate-folder-over-file", ["generate", "ckpt", *EMB, "--out",
                                   "notes.txt", *GEN], 1,
     ["--out notes.txt is a file"]),
    ("generate-over-foreign-video", ["generate", "ckpt", *EMB, "--out",
                                     "clip.mp4", "--vae", "vae",
                                     "--overwrite", *GEN], 1,
     ["--out clip.mp4 exists and is not an astraea-jax output"]),
    ("generate-around-schedule", ["generate", "ckpt", *EMB, "--out", "runs",
                                  "--schedule", "runs/schedule.json",
                                  "--overwrite", *GEN], 1,
     ["--out runs contains the input --schedule runs/schedule.json"]),
    # Values, named by their flags, before any model loads.
    ("generate-budget", ["generate", "ckpt", *EMB, "--out", "o", "--budget",
                         "1.5"], 2, ["argument --budget: 1.5", "(0, 1]"]),
    ("generate-steps", ["generate", "ckpt", *EMB, "--out", "o", "--steps",
                        "0"], 2, ["argument --steps: 0 is out of range"]),
    ("generate-guidance", ["generate", "ckpt", *EMB, "--out", "o",
                           "--guidance", "-3"], 2,
     ["argument --guidance: -3 is out of range: must be >= 0"]),
    ("generate-seed", ["generate", "ckpt", *EMB, "--out", "o", "--seed",
                       "-1"], 2, ["argument --seed"]),
    ("generate-size", ["generate", "ckpt", *EMB, "--out", "o", "--size",
                       "832by480"], 1, ["--size '832by480' must be"]),
    ("generate-height", ["generate", "ckpt", *EMB, "--out", "o", *GEN,
                         "--height", "36"], 1, ["multiples of 16"]),
    ("generate-compare-dense", ["generate", "ckpt", *EMB, "--out", "o",
                                "--compare", *GEN], 1,
     ["--compare", "--budget or --schedule"]),
    ("generate-bad-schedule", ["generate", "ckpt", *EMB, "--out", "o", *GEN,
                               "--schedule", "bad_schedule.json"], 1,
     ["--schedule bad_schedule.json: not a schedule file"]),
    ("generate-short-schedule", ["generate", "ckpt", *EMB, "--out", "o",
                                 "--steps", "4", "--schedule", "bare.json"],
     1, ["has 3 budgets but --steps is 4"]),
    ("generate-missing-schedule", ["generate", "ckpt", *EMB, "--out", "o",
                                   *GEN, "--schedule", "nothere.json"], 1,
     ["--schedule nothere.json", "No such file"]),
    ("generate-cache-dtype", ["generate", "ckpt", *EMB, "--out", "o", *GEN,
                              "--budget", "0.5", "--cache-dtype", "int4"], 2,
     ["argument --cache-dtype: invalid choice: 'int4'", "bfloat16",
      "float32", "float8"]),
    ("generate-delta-sketch", ["generate", "ckpt", *EMB, "--out", "o", *GEN,
                               "--budget", "0.5", "--delta-sketch", "48"], 2,
     ["argument --delta-sketch: invalid choice: 48",
      "0, 16, 32, 64, 128, 256"]),
    ("generate-vae-tile", ["generate", "ckpt", *EMB, "--out", "o", *GEN,
                           "--vae-tile", "100"], 2,
     ["argument --vae-tile", "100 is not a multiple of 8"]),
    ("generate-state-without-budget", ["generate", "ckpt", *EMB, "--out",
                                       "o", *GEN, "--cache-dtype", "float8"],
     1, ["--cache-dtype sets Astraea's token state: give --budget"]),
    ("generate-bad-embeddings", ["generate", "ckpt", "--text-embeddings",
                                 "notes.txt", "--out", "o", *GEN], 1,
     ["cannot read text embeddings notes.txt"]),
    ("demo-steps", ["demo", "--steps", "0"], 2, ["argument --steps"]),
    ("demo-timing-runs", ["demo", "--timing-runs", "-1"], 2,
     ["argument --timing-runs: -1 is out of range: must be >= 0"]),
    ("demo-guidance", ["demo", "--guidance", "-2"], 2, ["argument --guidance"]),
    ("demo-budget", ["demo", "--budget", "0"], 2, ["argument --budget: 0"]),
    ("demo-out-file", ["demo", "--out", "notes.txt"], 1,
     ["--out notes.txt is a file"]),
    ("demo-out-foreign", ["demo", "--out", "mine"], 1,
     ["--out mine exists and is not an astraea-jax output"]),
    ("demo-out-in-weights", ["demo", "--weights", "weights_copy", "--out",
                             "weights_copy/run"], 1,
     ["lies inside the input --weights weights_copy"]),
    ("demo-wrong-weights", ["demo", "--weights", "ckpt", "--out", "d"], 1,
     ["no demo model weights in ckpt"]),
    ("search-prompts-transformer", ["search", "--model", "ckpt",
                                    "--target-budget", "0.5", "--prompts",
                                    "prompts.txt", "--out", "s"], 1,
     ["--prompts needs a converted whole-model folder"]),
    ("search-out-foreign", ["search", "--model", "ckpt", "--target-budget",
                            "0.5", *EMB, "--out", "mine"], 1,
     ["--out mine exists and is not an astraea-jax output"]),
    ("search-target", ["search", "--model", "ckpt", "--target-budget", "0",
                       *EMB, "--out", "s"], 2, ["argument --target-budget"]),
    ("search-unconverted", ["search", "--model", "src", "--target-budget",
                            "0.5", *EMB, "--out", "s"], 1,
     ["src is a model as published"]),
    ("eval-out-file", ["eval", "--out", "notes.txt"], 1,
     ["--out notes.txt is a file"]),
    ("eval-budgets", ["eval", "--budgets", "0.4", "2", "--out", "e"], 2,
     ["argument --budgets: 2 is out of range"]),
    ("train-workdir-file", ["train-demo", "--workdir", "notes.txt",
                            "--steps", "1", "--small"], 1,
     ["--workdir notes.txt is a file"]),
    ("train-export-foreign", ["train-demo", "--workdir", "w", "--small",
                              "--export-only", "--export-to", "mine"], 1,
     ["--export-to mine exists and is not an astraea-jax output"]),
    ("train-batch", ["train-demo", "--workdir", "w", "--batch", "0"], 2,
     ["argument --batch: 0 is out of range"]),
]


def _tree_digest(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes())
                                     .hexdigest() if p.is_file() else "dir")
          for p in sorted(root.rglob("*"))}


def _damage(folder: pathlib.Path):
  """Random bytes over the largest orbax data file (its size kept): every
  compressed chunk in it fails to decode."""
  data = max((p for p in (folder / "params").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  size = data.stat().st_size
  data.write_bytes(data.read_bytes()[:64] + np.random.default_rng(0).integers(
      0, 256, size - 64, dtype=np.uint8).tobytes())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  root = tmp_path_factory.mktemp("abuse")
  config = WanConfig.tiny(num_layers=2, dim=64, ffn_dim=96, num_heads=2,
                          text_dim=24, text_len=8, freq_dim=16)
  testing.write_wan_checkpoint(root / "src", config, seed=1)
  testing.write_wan_checkpoint(root / "parent" / "src", config, seed=1)
  (root / "parent" / "unrelated.txt").write_text("not yours to delete")
  assert cli.main(["convert", str(root / "src"), str(root / "ckpt"),
                   "--quiet"]) == 0
  shutil.copytree(root / "ckpt", root / "ckpt_bad")
  _damage(root / "ckpt_bad")
  shutil.copytree(demo_model.WEIGHTS_DIR, root / "weights_copy")
  (root / "mine").mkdir()
  (root / "mine" / "thesis.tex").write_text("three years of work")
  (root / "notes.txt").write_text("my notes")
  (root / "clip.mp4").write_bytes(b"a video from somewhere else")
  (root / "vae").mkdir()
  (root / "prompts.txt").write_text("a cat\na dog\n")
  (root / "bare.json").write_text("[1.0, 0.5, 0.5]")
  (root / "runs").mkdir()  # an earlier output of ours, holding a schedule
  (root / "runs" / ".astraea-output.json").write_text(
      '{"written_by": "astraea-jax", "command": "search"}')
  (root / "runs" / "schedule.json").write_text('{"schedule": [1, 0.5, 0.5]}')
  (root / "bad_schedule.json").write_text('{"budgets": [1.0, 0.5, 0.5]}')
  save_file({"context": np.random.default_rng(0).standard_normal(
      (5, 24)).astype(np.float32)}, root / "emb.safetensors")
  return root


@pytest.fixture(scope="module")
def results(workspace):
  """{case id: (exit code, stdout + stderr, files before == after)}: every
  case in its own process, in a copy of the workspace of its own."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "ignore"}

  def run(case):
    name, argv, _, _ = case
    here = workspace.parent / f"case-{name}"
    # The demo weights (17 MB) only where the case reads them.
    skip = ([] if any(a == "DEMO" or "weights_copy" in a for a in argv)
            else ["weights_copy"])
    shutil.copytree(workspace, here, symlinks=True,
                    ignore=lambda d, names: [n for n in names if n in skip
                                             and d == str(workspace)])
    argv = [a.replace("DEMO", str(here / "weights_copy")) for a in argv]
    before = _tree_digest(here)
    proc = subprocess.run(
        [sys.executable, "-m", "astraea_jax.cli", *argv], cwd=here, env=env,
        capture_output=True, text=True, timeout=300, check=False)
    return name, (proc.returncode, proc.stdout + proc.stderr,
                  _tree_digest(here) == before)

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    return dict(pool.map(run, CASES))


@pytest.mark.parametrize("name,code,needles",
                         [(c[0], c[2], c[3]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_mistake_ends_in_one_clear_message(results, name, code, needles):
  exit_code, output, unchanged = results[name]
  assert exit_code == code, output
  for needle in needles:
    assert needle in output, output
  assert "Traceback" not in output and "Event loop is closed" not in output
  assert unchanged, f"{name}: files in the workspace changed"


def test_a_run_that_cannot_fit_stops_before_sampling(workspace, tmp_path):
  """A device of 64 KiB ($ASTRAEA_DEVICE_MEMORY simulates it): the estimate
  from the compiled first step says no, in one line naming the options,
  before any step ran; nothing is written."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "ASTRAEA_DEVICE_MEMORY":
         "64KiB"}
  proc = subprocess.run(
      [sys.executable, "-m", "astraea_jax.cli", "generate",
       str(workspace / "ckpt"), "--text-embeddings",
       str(workspace / "emb.safetensors"), "--out", str(tmp_path / "o"),
       *GEN, "--budget", "0.5"], capture_output=True, text=True, env=env,
      check=False)
  assert proc.returncode == 1, proc.stderr
  err = proc.stderr
  assert "this run needs about" in err and "device has 0.0 GiB" in err
  assert "nothing was sampled" in err and "--devices" in err
  assert "Traceback" not in err and "RESOURCE_EXHAUSTED" not in err
  assert not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(workspace, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "astraea_jax.cli", "generate",
       str(workspace / "nothere"), "--text-embeddings",
       str(workspace / "emb.safetensors"), "--out", str(tmp_path / "o"),
       "--debug"], capture_output=True, text=True, check=False)
  assert proc.returncode != 0
  assert "Traceback" in proc.stderr and "NotACheckpointError" in proc.stderr


def test_overwrite_replaces_only_an_earlier_output(workspace, tmp_path,
                                                   capsys):
  """What --overwrite may replace: our own earlier outputs (checked with
  the marker file and, for videos, the MP4's metadata)."""
  ckpt = str(workspace / "ckpt")
  out = tmp_path / "run"
  args = ["generate", ckpt, "--text-embeddings",
          str(workspace / "emb.safetensors"), *GEN, "--budget", "0.6"]
  assert cli.main([*args, "--out", str(out)]) == 0
  assert json.loads((out / ".astraea-output.json").read_text())[
      "written_by"] == "astraea-jax"
  assert cli.main([*args, "--out", str(out)]) == 1
  assert "pass --overwrite" in capsys.readouterr().err
  (out / "old.txt").write_text("from the first run")
  assert cli.main([*args, "--out", str(out), "--overwrite"]) == 0
  assert not (out / "old.txt").exists()


def test_degenerate_budget_runs_dense_and_says_so(workspace, tmp_path,
                                                  capsys):
  """2 steps at budget 0.5 leave nothing after the full first step: every
  step runs dense, with a warning; the speedup is printed only from
  compiled steps."""
  out = tmp_path / "run"
  assert cli.main(["generate", str(workspace / "ckpt"), "--text-embeddings",
                   str(workspace / "emb.safetensors"), "--out", str(out),
                   "--height", "32", "--width", "48", "--frames", "5",
                   "--steps", "2", "--budget", "0.5", "--compare"]) == 0
  captured = capsys.readouterr()
  assert "all 2 steps run the full model" in captured.err
  report = json.loads((out / "report.json").read_text())
  assert report["astraea"]["schedule"] == [1.0, 1.0]
  assert "speedup 0.00x" not in captured.out


def test_empty_prompt_says_it_samples_unconditionally(capsys):
  common.note_empty_prompt("  ")
  assert "samples unconditionally" in capsys.readouterr().err
  common.note_empty_prompt("a cat")
  assert capsys.readouterr().err == ""
