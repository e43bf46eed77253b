"""What each figure in benchmarks/results/*.json is: measured, composed or
projected, with the rule in words (issue #24).

  measured   read off one run of exactly the thing named (a median over
             repeats of that run is still measured);
  composed   arithmetic over measured parts that never ran together as the
             thing named: a 50-step time summed from per-step medians, an
             end-to-end time summed from stages timed separately, a ratio
             of two different measures (XLA's memory estimate vs PyTorch's
             allocator peak), a fraction of a constant measured elsewhere;
  projected  beyond what ran: step times scaled to more steps, per-step
             seconds interpolated to budgets not timed, a search whose
             cost was counted but not run, another model's times used to
             price a plan, predictions for device counts not measured.

`label(doc)` adds {"kind", "kind_rule"} to every row and target of a
results document; `common.write_results` calls it, so the scripts write
the labels from now on, and `python benchmarks/kinds.py` relabels the
stored files (no number is changed). Each benchmark's rule below was
decided from its script; a row or target no rule names fails loudly.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

MEASURED, COMPOSED, PROJECTED = "measured", "composed", "projected"
KINDS = (MEASURED, COMPOSED, PROJECTED)

SUM_OF_STEPS = ("schedule time = sum over its steps of per-step medians "
                "timed one configuration at a time; the whole run was "
                "never timed")
ONE_RUN = "timed/measured directly in one run (median over repeats)"


def _astraea(row=None, target=None):
  """benchmarks/astraea_wan.py, astraea_opensora.py."""
  if row is not None:
    if "extrapolated_s" in row:
      return COMPOSED, SUM_OF_STEPS
    if row.get("method") == "peak_memory":
      return MEASURED, ("device allocator peak (peak_bytes_in_use) read "
                        "after the dense, then after the Astraea runs, in "
                        "ONE process: the Astraea figure is the process "
                        "peak so far, not a separate process")
    return MEASURED, ONE_RUN
  name = target["name"]
  if name.startswith("speedup_budget"):
    return COMPOSED, "dense 50-step time / " + SUM_OF_STEPS
  if name.startswith("bookkeeping"):
    return MEASURED, "ratio of two step times timed in the same run"
  if name == "peak_memory_ratio":
    return MEASURED, ("ratio of the two allocator peaks of the "
                      "peak_memory row (same process; see that row)")
  return None


def _attention(row=None, target=None):
  if row is not None:
    if "error" in row:
      return MEASURED, "the run failed; the row carries no figure"
    return MEASURED, ONE_RUN
  name = target["name"]
  if name.startswith("dense_tflops_fraction_of_matmul_ceiling"):
    return COMPOSED, ("measured TFLOP/s over a matmul ceiling constant "
                      "measured separately (MATMUL_CEILING_TFLOPS)")
  return MEASURED, "ratio of two kernels timed in the same run"


def _demo(row=None, target=None):
  """demo_agreement.py, demo_sampling.py: agreement read off videos."""
  return MEASURED, ("agreement of videos generated in this run, read back "
                    "by demo_model.analysis")


def _dense_wan(row=None, target=None):
  if row is not None:
    if "skipped" in row:
      return MEASURED, "not run (the row says why); carries no figure"
    return MEASURED, ONE_RUN + "; peak_gib: ours = XLA memory_analysis " \
        "of the executable (an estimate), diffusers = " \
        "torch.cuda.max_memory_allocated"
  name = target["name"]
  if name.startswith("peak_memory_ours_over_diffusers"):
    return COMPOSED, ("ratio of two different measures: XLA's "
                      "memory_analysis estimate (ours) over PyTorch's "
                      "allocator peak (diffusers)")
  if name.startswith("ours_time_over_fastest_diffusers"):
    return MEASURED, ("ratio of forward times timed in this run; "
                      "'compared' lists which diffusers modes ran (14B: "
                      "eager only)")
  if name.startswith("bf16_error_ours_over"):
    return MEASURED, "ratio of two errors measured in this run"
  return MEASURED, "read off this run (one timed or computed value)"


def _eval_quality(row=None, target=None):
  """benchmarks/eval_quality.py (eval_demo.json)."""
  rule = ("PSNR/SSIM and speedup_cpu measured on the demo model on CPU "
          "(speedup_cpu includes compile time where "
          "timing_includes_compile); speedup_h200 PROJECTED: the demo "
          "model's per-step plans priced with Wan2.1-1.3B per-step times "
          "from eval_speed_h200.json, summed over the steps")
  if row is not None:
    return PROJECTED if "speedup_h200" in row else MEASURED, rule
  name = target["name"]
  if name.startswith("score_vs_random"):
    return MEASURED, "PSNR difference of two settings at the same budget"
  if name.startswith("psnr_change_"):
    return MEASURED, ("mean over the samples of the PSNR difference of two "
                      "token states at the same budget, same noise")
  return PROJECTED, ("reads speedup_h200 (the demo model's plans priced "
                     "with Wan2.1-1.3B step times) beside the demo "
                     "model's measured quality")


def _eval_speed(row=None, target=None):
  if row is not None:
    rtype = row.get("row")
    if rtype in ("step_config", "peak_memory"):
      return MEASURED, ONE_RUN
    if rtype == "policy":
      return COMPOSED, ("a setting's 50-step time = sum of its steps' "
                        "cost_key medians; settings sharing a cost_key "
                        "(e.g. three ablations) share its time, which was "
                        "never measured for each of them")
    if rtype == "step_cache_computed_steps":
      return COMPOSED, ("computed steps counted on the demo model, priced "
                        "with the full-size step times")
    return None
  return COMPOSED, "reads the composed policy rows"


def _parallel(row=None, target=None):
  if row is not None:
    rtype = row.get("row")
    if rtype == "bandwidth":
      return MEASURED, "collective bandwidth timed in this run"
    if rtype == "prediction":
      return PROJECTED, ("predicted for device counts not measured, from "
                         "measured compute and bandwidth")
    if rtype == "measured":
      if row.get("method") == "summary":
        return COMPOSED, ("50-step times = sum over the schedule of "
                          "per-step medians timed per configuration")
      return MEASURED, ONE_RUN
    return None
  return COMPOSED, "ratio of 50-step times summed from per-step medians"


def _pipeline_wan(row=None, target=None):
  if row is not None:
    stage = row.get("stage")
    if stage == "denoise" and "extrapolated_from_steps" in row:
      return PROJECTED, ("50 x the median of extrapolated_from_steps "
                         "timed steps")
    if stage == "denoise" and "extrapolated" in row:
      return COMPOSED, "sum of the per-K step medians over the schedule"
    if stage == "end_to_end":
      return COMPOSED, ("text + denoise + decode times measured "
                        "separately, added (denoise itself composed or "
                        "projected); no end-to-end run was timed")
    if stage == "peak_memory":
      return MEASURED, ("allocator peaks (ours: peak_bytes_in_use; "
                        "diffusers: torch.cuda.max_memory_allocated) read "
                        "after each stage in one process")
    return MEASURED, ONE_RUN
  name = target["name"]
  if name.startswith("end_to_end"):
    return COMPOSED, "reads the composed end_to_end rows"
  return COMPOSED, ("dense denoise (50 x median step, projected) over "
                    "the Astraea schedule summed from per-K medians")


def _sampling_loop(row=None, target=None):
  if row is not None:
    return MEASURED, ONE_RUN
  return MEASURED, "ratio/difference of loops timed in the same run"


def _search_cost(row=None, target=None):
  rule = ("GPU-hours = row-steps counted by replaying a search's calls "
          "(no model) x seconds per row-step measured at a few budgets "
          "and interpolated to the others: no search was run or timed")
  if row is not None:
    if "timing" in row:
      return MEASURED, ("seconds per row-step timed at the budgets listed "
                        "in sparse_measured; sparse_by_budget interpolates "
                        "the rest (projected)")
    return PROJECTED, rule
  return PROJECTED, rule


_SEARCHED_ON_DEMO = ("searches and fitness evaluations run on the demo "
                     "model in this run; row-steps counted as computed")
_QUALITY_ON_DEMO = ("PSNR/SSIM of clips generated in this run against "
                    "the full model's from the same noise and caption")


def _demo_search_rule(counted, searched, compared, compared_rule,
                      projected_targets):
  """The rule of a DP-search benchmark on the demo model: its paper-setting
  counts (and the targets named by projected_targets) projected, its
  searches (rows searched) and quality rows (rows compared) measured."""
  def rule(row=None, target=None):
    if row is not None:
      kind = row.get("row")
      if kind == "paper_setting_count":
        return PROJECTED, counted
      if kind in searched:
        return MEASURED, _SEARCHED_ON_DEMO
      if kind in compared:
        return MEASURED, compared_rule
      return None
    if target["name"].startswith(projected_targets):
      return PROJECTED, counted
    return MEASURED, "read off the measured rows of this run"
  return rule


# benchmarks/search_dp_demo.py: searches run on the demo model.
_search_generalisation = _demo_search_rule(
    ("the DP search's calls at the paper's settings (50 steps, 4 "
     "samples) replayed through search.TreeCounter without a model, "
     "against the GA's counts and per-budget seconds per row-step "
     "of search_cost_h200.json: counted and priced, not run"),
    ("dp_run", "ga_run", "additivity", "schedule"), ("quality",),
    _QUALITY_ON_DEMO, ("search_count_ratio", "search_h200_hours"))


def _search_proxy(row=None, target=None):
  """benchmarks/search_proxy.py: fitness runs on the demo model."""
  if row is not None:
    if row.get("row") == "candidates":
      return MEASURED, "the candidate genomes drawn in this run"
    return MEASURED, ("fitness of every candidate computed in this run by "
                      "the full fitness and by the proxy (its s-sample "
                      "version: the first s samples' rows of the same "
                      "run); Spearman rho between them; row-steps counted "
                      "as computed, wall seconds of the same process")
  return MEASURED, "read off the measured rows of this run"


def _search_validate(row=None, target=None):
  """benchmarks/search_validate.py: a reduced DP search run and timed."""
  if row is not None and "timing" in row:
    return _search_cost(row=row)
  return MEASURED, ("a DP search run on the GPU and timed with the wall "
                    "clock in this process, beside the projection's pricing "
                    "of the same calls (TreeCounter replay x seconds per "
                    "row-step timed in this process)")


# benchmarks/search_proxy_dp.py: DP searches run on the demo model.
_search_proxy_dp = _demo_search_rule(
    ("the DP search's calls at the paper's settings (50 steps; 2 "
     "or 4 samples) replayed through search.TreeCounter without a "
     "model, priced with search_cost_h200.json's seconds per "
     "row-step: counted and priced, not run"),
    ("dp_run", "schedule"), ("quality", "paired"),
    _QUALITY_ON_DEMO + "; paired differences over the same captions",
    ("search_h200_hours",))


def _kernel_check(row=None, target=None):
  return MEASURED, ("each case run once (compiled unless interpret) "
                    "against a float64 NumPy reference")


def _end_to_end(row=None, target=None):
  """benchmarks/astraea_end_to_end.py: whole runs, one process each."""
  if row is not None:
    if row.get("failed"):
      return MEASURED, "the run failed; the row carries no figure"
    if row.get("name") == "user_generate_compare":
      return MEASURED, ("`astraea generate --compare` run as a user runs "
                        "it; its report.json as written")
    return MEASURED, ("whole runs timed with the wall clock in a process "
                      "of their own; peak_bytes_in_use of that process")
  if target["name"].startswith("estimate_error"):
    return MEASURED, ("the estimate made before the run against the peak "
                      "measured after it, same process")
  return MEASURED, ("ratio of two whole runs (or two process peaks) "
                    "measured on the same GPU in the same device call")


def _pipeline_memory(row=None, target=None):
  """benchmarks/pipeline_memory.py: one process per row."""
  if row is not None:
    if row.get("error"):
      return MEASURED, "the run failed; the row carries no figure"
    if row.get("name", "").startswith("diffusers"):
      return MEASURED, ("one process of diffusers' WanPipeline: "
                        "torch.cuda.max_memory_allocated (cumulative) and "
                        "wall times of whole runs")
    return MEASURED, ("one process: peak_bytes_in_use of its device "
                      "allocator (cumulative, compiles included) and wall "
                      "times of its runs")
  if target["name"].startswith("whole_dense_") and "over_diffusers" in \
      target["name"]:
    return MEASURED, ("ratio of whole-run wall times (text encoding, 50 "
                      "steps, decode) of ours and diffusers' WanPipeline, "
                      "each in its own process on the same GPU in the same "
                      "device call")
  if target["name"].startswith("time_ratio"):
    return MEASURED, ("ratio of the second (compiled) run's wall time of two "
                      "processes on the same GPU in the same device call")
  return MEASURED, "the process peak of the row named in the target"


def _step_profile(row=None, target=None):
  """benchmarks/astraea_step_profile.py: programs of one process."""
  if row is not None:
    return MEASURED, ("one compiled program: XLA compile seconds once, "
                      "step time the median of repeated calls")
  if target["name"].startswith("bookkeeping"):
    return COMPOSED, ("two programs timed apart (the scores + top-K of "
                      "every block; the cache writes and x + update of "
                      "every block) summed, over the dense step's time, "
                      "all in the same process")
  return MEASURED, "ratio of two programs' figures in the same process"


def _expert_switch(row=None, target=None):
  """benchmarks/expert_switch.py: tiny random experts on CPU."""
  if row is not None:
    return MEASURED, ("final latents of tiny random two-expert models "
                      "sampled in this run (CPU, float32) against the dense "
                      "two-expert sample from the same noise; cost = tokens "
                      "computed, counted by the sampler")
  return MEASURED, ("difference of two mean PSNRs measured in this run "
                    "on the same samples")


RULES = {"kernel_check": _kernel_check, "astraea_wan": _astraea,
         "astraea_opensora": _astraea, "astraea_end_to_end": _end_to_end,
         "attention": _attention, "demo_agreement": _demo,
         "demo_sampling": _demo, "dense_wan": _dense_wan,
         "eval_quality": _eval_quality, "eval": _eval_quality,
         "eval_speed": _eval_speed,
         "parallel": _parallel, "pipeline_wan": _pipeline_wan,
         "pipeline_memory": _pipeline_memory,
         "sampling_loop": _sampling_loop, "search_cost": _search_cost,
         "astraea_step_profile": _step_profile,
         "search_generalisation": _search_generalisation,
         "expert_switch": _expert_switch, "search_proxy": _search_proxy,
         "search_validate": _search_validate,
         "search_proxy_dp": _search_proxy_dp}


def label(doc: dict) -> dict:
  """doc with "kind" and "kind_rule" on every row and target."""
  rule = RULES.get(doc.get("benchmark"))
  if rule is None:
    raise ValueError(f"no kind rule for benchmark {doc.get('benchmark')!r}; "
                     "add one to benchmarks/kinds.py")
  for field, arg in (("rows", "row"), ("targets", "target")):
    for item in doc.get(field, []):
      decided = rule(**{arg: item})
      if decided is None or decided[0] not in KINDS:
        raise ValueError(f"{doc['benchmark']}: no kind for {arg} {item}")
      item["kind"], item["kind_rule"] = decided
  return doc


def relabel(path) -> None:
  """Adds the labels to a stored results file (numbers untouched)."""
  path = pathlib.Path(path)
  text = path.read_text()
  indent = 1 if text.startswith('{\n "') else 2  # keep the file's layout
  doc = json.loads(text)
  if "rows" not in doc:
    return
  for row in doc["rows"]:  # the old row-type key of two benchmarks
    if doc["benchmark"] in ("eval_speed", "parallel") and "kind" in row \
        and "row" not in row:
      row["row"] = row.pop("kind")
  commit = str(doc.get("commit"))
  if not re.fullmatch(r"[0-9a-f]{7,40}", commit) and "source_note" not in doc:
    doc["source_note"] = (
        f"commit recorded as free text ({commit!r}) before provenance "
        "hashed uncommitted changes (issue #24): the exact source of these "
        "numbers is unknown")
  path.write_text(json.dumps(label(doc), indent=indent) + "\n")


if __name__ == "__main__":
  results = pathlib.Path(__file__).parent / "results"
  for p in sys.argv[1:] or sorted(results.glob("*.json")):
    relabel(p)
    print("labelled", p)
