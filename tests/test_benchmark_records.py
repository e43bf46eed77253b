"""Benchmark records say what they are (issue #24), and provenance hashes
uncommitted changes instead of recording free text."""

import json
import pathlib
import subprocess
import sys

import pytest

from astraea_jax import provenance, testing

BENCH = testing.REPO_ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import kinds  # noqa: E402  (benchmarks/kinds.py)

RESULTS = sorted((BENCH / "results").glob("*.json"))


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_every_stored_row_and_target_is_labelled(path):
  doc = json.loads(path.read_text())
  if "rows" not in doc:  # training logs (demo_train_*), not results
    assert "benchmark" not in doc
    return
  for item in doc["rows"] + doc["targets"]:
    assert item["kind"] in kinds.KINDS, item
    assert len(item["kind_rule"]) > 20, item
  relabelled = kinds.label(json.loads(path.read_text()))
  assert relabelled == doc  # the stored labels are the rules' labels


def test_labels_follow_the_rules_and_unknowns_fail():
  doc = {"benchmark": "astraea_wan", "rows": [
      {"method": "dense", "ms_per_step": 1.0},
      {"method": "schedule", "extrapolated_s": 3.0, "speedup": 2.0}],
         "targets": [{"name": "speedup_budget_0.4", "value": 2.0}]}
  kinds.label(doc)
  assert [r["kind"] for r in doc["rows"]] == ["measured", "composed"]
  assert doc["targets"][0]["kind"] == "composed"
  with pytest.raises(ValueError, match="no kind rule"):
    kinds.label({"benchmark": "new_benchmark", "rows": [], "targets": []})
  with pytest.raises(ValueError, match="no kind for row"):
    kinds.label({"benchmark": "parallel", "rows": [{"row": "other"}],
                 "targets": []})


def test_provenance_hashes_the_uncommitted_diff(tmp_path, monkeypatch):
  repo = tmp_path / "repo"
  repo.mkdir()
  git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True,
                                  capture_output=True)
  git("init", "-q")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
      "--allow-empty", "-m", "x")
  (repo / "a.py").write_text("1\n")
  git("add", "a.py")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m",
      "a")
  monkeypatch.setattr(provenance, "REPO", repo)
  clean = provenance.source()
  assert clean["dirty"] is False and clean["diff_sha256"] is None
  assert len(clean["commit"]) >= 7
  (repo / "a.py").write_text("2\n")
  first = provenance.source()
  assert first["dirty"] and len(first["diff_sha256"]) == 64
  assert provenance.source() == first  # same source, same hash
  (repo / "a.py").write_text("3\n")
  assert provenance.source()["diff_sha256"] != first["diff_sha256"]
  (repo / "a.py").write_text("1\n")
  (repo / "new.py").write_text("x\n")  # untracked files count too
  untracked = provenance.source()
  assert untracked["dirty"] and untracked["diff_sha256"] not in (
      None, first["diff_sha256"])
