"""benchmarks/gpu_run.py's pure helpers: variant names, the budget-driven
step count, derived figures and the results table (the script itself runs
on a GPU machine; its CPU end-to-end check is in its docstring)."""

import pathlib
import sys

import pytest

sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks")
)

import gpu_run  # noqa: E402


def test_parse_variant():
  assert gpu_run.parse_variant("bf16_fused") == ("bfloat16", True, "auto")
  assert gpu_run.parse_variant("fp32") == ("float32", False, "auto")
  assert gpu_run.parse_variant("fp32_fused") == ("float32", True, "auto")
  assert gpu_run.parse_variant("bf16_fused_fft") == ("bfloat16", True, "fft")
  for bad in ("fp16", "bf16_fast", ""):
    with pytest.raises(ValueError):
      gpu_run.parse_variant(bad)


def test_plan_train_steps_keeps_the_reserve_when_it_can():
  steps, keep, _ = gpu_run.plan_train_steps(
      time_left=300,
      step_s=0.1,
      reserve_s=120,
      overhead_s=60,
      margin=1.25,
      min_steps=50,
      max_steps=5000,
  )
  assert keep and steps == int((300 - 120 - 60) / 0.125)
  steps, keep, _ = gpu_run.plan_train_steps(300, 0.001, 120, 60, 1.0, 50, 700)
  assert keep and steps == 700  # clipped


def test_plan_train_steps_drops_the_reserve_then_gives_up():
  steps, keep, why = gpu_run.plan_train_steps(100, 1.0, 120, 60, 1.0, 50, 5000)
  assert (steps, keep) == (0, False) and "not even 50" in why
  steps, keep, why = gpu_run.plan_train_steps(200, 1.0, 120, 60, 1.0, 30, 5000)
  assert (steps, keep) == (140, False) and "dropping the reserve" in why


def test_derived_figures():
  flops = {"bf16_fused": 2384.0}
  tflop = gpu_run.train_tflop(flops, "bf16_fused", 2)
  assert tflop == pytest.approx(2384.0 * 3 * 2 / 1e3)
  assert gpu_run.train_tflop(flops, "fp32", 2) is None
  r = gpu_run.derive({}, tflop, 0.1, 800.0)
  assert r["achieved_tflops"] == pytest.approx(tflop / 0.1)
  assert r["fraction_of_bf16_matmul_peak"] == pytest.approx(tflop / 0.1 / 800)
  assert r["projected_hours_80k_steps"] == pytest.approx(0.1 * 80000 / 3600)
  assert gpu_run.derive({}, None, 0.1, 800.0) == {
      "projected_hours_80k_steps": pytest.approx(0.1 * 80000 / 3600)
  }


def test_markdown_shows_figures_errors_and_progress():
  results = {
      "card": "NVIDIA H100 80GB HBM3",
      "status": "running",
      "budget_s": 420,
      "elapsed_s": 100.0,
      "matmul_peak": {"bf16_tflops": 790.0, "n": 8192},
      "torch_twin": {
          "child": "exit code 0",
          "bf16_fused": {
              "ms_per_step": 120.0,
              "first_step_s": 9.0,
              "achieved_tflops": 119.0,
              "max_memory_allocated_gib": 20.0,
          },
          "fp32": "failed: OutOfMemoryError: CUDA | out of memory",
      },
      "jax_train_step": {
          "bf16_fused": {
              "ms_per_step": 100.0,
              "compile_s": 25.0,
              "achieved_tflops": 143.0,
              "run_order": 1,
              "memory_analysis_peak_gib": 30.0,
              "host_s_per_batch": 0.09,
              "inference_s_per_patient": 0.05,
              "grid": 128,
          },
          "fp32": {"error": "XlaRuntimeError: RESOURCE_EXHAUSTED"},
      },
      "training_run": {
          "variant": "bf16_fused",
          "steps": 800,
          "progress": {
              "last_step": 400,
              "loss_curve": [[25, 0.5], [400, 0.2]],
              "steps_per_second": 8.0,
          },
      },
  }
  table = gpu_run.markdown(results)
  assert "NVIDIA H100 80GB HBM3" in table
  assert "| JAX bf16_fused | 100.0 | 25.0 | 143 |" in table
  assert (
      "PyTorch twin fp32: failed: OutOfMemoryError: CUDA / out of memory"
      in table
  )
  assert "JAX fp32: XlaRuntimeError: RESOURCE_EXHAUSTED" in table
  assert "at step 400 of 800, loss 0.2" in table
  results["training_run"] = {
      "variant": "bf16_fused",
      "steps": 800,
      "seconds_per_step": 0.12,
      "achieved_tflops": 119.0,
      "wall_s": 200.0,
      "overhead_s": 50.0,
      "validation": {
          "dose_score": 5.0,
          "dvh_score": 3.0,
          "num_patients": 6,
          "baseline_mean_dose_score": 10.6,
          "baseline_mean_dvh_score": 9.0,
      },
  }
  table = gpu_run.markdown(results)
  assert "| 5.000 | 3.000 |" in table and "| 10.600 | 9.000 |" in table


def test_pick_training_variant():
  timed = {
      "bf16_fused": {
          "ms_per_step": 800.0,
          "host_s_per_batch": 0.09,
          "compile_s": 25.0,
      },
      "bf16_fused_fft": {"ms_per_step": 300.0, "compile_s": 40.0},
  }
  early = ["bf16_fused", "bf16_fused_fft"]
  name, step_s, extra, _ = gpu_run.pick_training_variant(
      "bf16_fused", early, timed, 0.8, True
  )
  assert (name, step_s, extra) == ("bf16_fused_fft", 0.3, 40.0)
  # Not asked to, or not 1.5x faster, or the first failed: the first entry.
  assert gpu_run.pick_training_variant("bf16_fused", early, timed, 0.8, False)[
      :3
  ] == ("bf16_fused", 0.8, 0.0)
  timed["bf16_fused_fft"]["ms_per_step"] = 600.0
  assert (
      gpu_run.pick_training_variant("bf16_fused", early, timed, 0.8, True)[0]
      == "bf16_fused"
  )
  timed["bf16_fused"] = "failed: OOM"
  assert gpu_run.pick_training_variant("bf16_fused", early, timed, None, True)[
      :2
  ] == ("bf16_fused", None)
  # The host side bounds the run's step.
  timed = {
      "a": {"ms_per_step": 100.0, "host_s_per_batch": 0.09},
      "b": {"ms_per_step": 20.0, "compile_s": 10.0},
  }
  assert (
      gpu_run.pick_training_variant("a", ["a", "b"], timed, 0.1, True)[1]
      == 0.09
  )
