"""benchmarks/run_curve.py: a run's curve from its console and metrics, a
resumed run's time between sessions left out."""

import json

from tests import helpers


def test_a_resumed_run_counts_training_time_only(tmp_path):
  (tmp_path / "train.log").write_text(
      "1000 Training randose for 20 steps\n"
      "1600 step 10: validation dose score 5.0, DVH score 3.0\n"
      "1700 interrupted at step 12; checkpoint saved\n"
      # A day later, the next session resumes it.
      "90000 Resuming from checkpoint at step 12 (ckpt)\n"
      "90500 step 20: validation dose score 4.0, DVH score 2.0\n"
  )
  rows = [
      {"step": 10, "eval/dose_score": 5.0, "eval/dvh_score": 3.0},
      {"step": 11, "train/loss": 0.5},
      {"step": 20, "eval/dose_score": 4.0, "eval/dvh_score": 2.0},
  ]
  for row in rows:
    if "eval/dose_score" in row:
      row["eval/num_patients"] = 33
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows)
  )
  evals = helpers.load_benchmark("run_curve").curve(tmp_path)
  assert [(e["step"], e["wall_s"]) for e in evals] == [(10, 600), (20, 1200)]
  assert evals[1]["dose_score"] == 4.0 and evals[1]["num_patients"] == 33
