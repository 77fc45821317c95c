"""predict (CSV + zip, TTA, formats, plots, patients without dose) and export."""

import json
import pathlib
import shutil
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randose_jax.inference import export
from randose_jax.inference import forward as inference
from randose_jax.inference import predict_folders
from randose_jax.inference import restore
from randose_jax.data import encoding
from randose_jax.data import openkbp
from tests.test_fault_table import run_in_process
from tests.test_train import REPO, SUBPROCESS_ENV


def _patients_without_dose(trained, tmp_path):
  src = trained / "synthetic" / "validation-pats"
  dst = tmp_path / "to-predict"
  shutil.copytree(src, dst)
  for d in dst.glob("pt_*"):
    (d / "dose.csv").unlink()
  return dst


# The flips written out with numpy, independently of `inference`: a batch is
# (N, D, H, W, C) with H patient left/right (array axis 2) and W superior/
# inferior (array axis 3); OAR channels 2 and 3 are RightParotid and
# LeftParotid and trade places under the left/right flip.
LR, SI = 2, 3
OAR_LR_ORDER = [0, 1, 3, 2, 4, 5, 6]
FLIPS = ((False, False), (False, True), (True, False), (True, True))


def _flip_axes(lr, si):
  return tuple(a for a, on in ((LR, lr), (SI, si)) if on)


def _flipped(inputs, lr, si):
  out = {
      k: np.flip(np.asarray(x), _flip_axes(lr, si)) for k, x in inputs.items()
  }
  if lr:
    out["oar"] = out["oar"][..., OAR_LR_ORDER]
  return out


def _inputs(batch, seed):
  # Distinct lengths on every grid axis, so a flip on the wrong one shows.
  rng = np.random.default_rng(seed)
  return {
      "ptv": rng.uniform(size=(batch, 4, 6, 8, 1)).astype(np.float32),
      "ct": rng.uniform(size=(batch, 4, 6, 8, 1)).astype(np.float32),
      "oar": rng.uniform(size=(batch, 4, 6, 8, 7)).astype(np.float32),
  }


def test_flips_are_the_left_right_and_superior_inferior_axes():
  assert openkbp.ROI_NAMES[2:4] == ("RightParotid", "LeftParotid")
  inputs = _inputs(1, 0)
  for lr, si in FLIPS:
    got = inference.flip_inputs(inputs, lr, si)
    want = _flipped(inputs, lr, si)
    for key in inputs:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    np.testing.assert_array_equal(
        inference.unflip(inputs["ct"], lr, si),
        np.flip(inputs["ct"], _flip_axes(lr, si)),
    )
  # TTA undoes each flip: a model that returns its CT input gives it back.
  out = inference.predict(lambda x: x["ct"], inputs, tta=True)
  np.testing.assert_allclose(out, inputs["ct"], rtol=1e-6)
  # A model that reads the right parotid, weighted by a fixed map that does
  # not flip with the input: the left/right passes see the left parotid,
  # mirrored, and their predictions come back mirrored.
  ramp = np.arange(4 * 6 * 8, dtype=np.float32).reshape(1, 4, 6, 8, 1)
  out = inference.predict(lambda x: x["oar"][..., 2:3] * ramp, inputs, tta=True)
  right, left = inputs["oar"][..., 2:3], inputs["oar"][..., 3:4]
  want = (
      right * ramp
      + right * np.flip(ramp, SI)
      + left * np.flip(ramp, LR)
      + left * np.flip(ramp, (LR, SI))
  ) / 4
  np.testing.assert_allclose(out, want, rtol=1e-6)


def test_tta_is_the_mean_of_the_four_unflipped_predictions():
  # A model that is not flip-symmetric (cumulative sums along both flipped
  # axes, weighted by a parotid channel): TTA must equal the mean of the
  # four predictions on the numpy-flipped inputs, flipped back.
  inputs = _inputs(2, 1)

  def model(x):
    y = jnp.cumsum(jnp.cumsum(x["ct"] * x["oar"][..., 2:3], 2), 3)
    return y + x["ptv"]

  want = (
      sum(
          np.flip(
              np.asarray(model(_flipped(inputs, lr, si))), _flip_axes(lr, si)
          )
          for lr, si in FLIPS
      )
      / 4
  )
  got = jax.jit(lambda i: inference.predict(model, i, tta=True))(inputs)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  plain = inference.predict(model, inputs, tta=False)
  assert np.abs(np.asarray(plain) - np.asarray(got)).max() > 1e-3


def test_predict_writes_csv_zip_formats_and_plots(trained, tmp_path):
  patients = _patients_without_dose(trained, tmp_path)
  out = tmp_path / "out"
  restored = restore.restore_from_workdir(trained, "best")
  summary = predict_folders.predict_patients(
      restored,
      openkbp.list_patient_dirs(patients),
      out,
      tta=True,
      formats=("csv", "nifti", "dicom"),
      plots_dir=tmp_path / "plots",
      log=lambda *_: None,
  )
  assert "dose_score" not in summary  # no reference dose to score against
  names = sorted(p.name for p in out.iterdir())
  assert names == [
      "pt_5.csv",
      "pt_5.dcm",
      "pt_5.nii.gz",
      "pt_6.csv",
      "pt_6.dcm",
      "pt_6.nii.gz",
  ]
  with zipfile.ZipFile(summary["submission_zip"]) as zf:
    assert sorted(zf.namelist()) == ["pt_5.csv", "pt_6.csv"]
  for pid in ("pt_5", "pt_6"):
    patient = openkbp.load_patient(patients / pid)
    dose = openkbp.read_prediction_csv(
        out / f"{pid}.csv", patient.possible_dose_mask.shape
    )
    assert dose.min() >= 0 and dose.max() > 0
    assert not dose[~patient.possible_dose_mask].any()
    assert (tmp_path / "plots" / f"{pid}_slices.png").is_file()
  # Refuses to overwrite what is there without --overwrite.
  with pytest.raises(FileExistsError, match="already holds predictions"):
    predict_folders.predict_patients(
        restored, openkbp.list_patient_dirs(patients), out, log=lambda *_: None
    )


def test_predict_cli_scores_patients_with_dose(trained, tmp_path):
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "randose_jax.cli.predict",
          f"--workdir={trained}",
          f"--patients={trained / 'synthetic' / 'validation-pats'}",
          f"--output={tmp_path / 'preds'}",
          "--checkpoint=latest",
      ],
      cwd=REPO,
      env=SUBPROCESS_ENV,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  dose_line = next(i for i, l in enumerate(lines) if l.startswith("dose score"))
  assert lines[dose_line + 1].startswith("DVH score")
  summary = json.loads(lines[-1])
  assert summary["checkpoint"] == "latest" and summary["checkpoint_step"] == 4
  # The same predictions scored by the evaluate command give the same scores.
  ev = subprocess.run(
      [
          sys.executable,
          "-m",
          "randose_jax.cli.evaluate",
          f"--reference={trained / 'synthetic' / 'validation-pats'}",
          f"--predictions={tmp_path / 'preds'}",
          f"--json={tmp_path / 's.json'}",
      ],
      cwd=REPO,
      env=SUBPROCESS_ENV,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert ev.returncode == 0, ev.stderr[-3000:]
  scores = json.loads((tmp_path / "s.json").read_text())
  assert scores["dose_score"] == pytest.approx(summary["dose_score"], rel=1e-5)
  assert scores["dvh_score"] == pytest.approx(summary["dvh_score"], rel=1e-5)


def test_predict_cli_bad_workdir_is_a_clear_error(tmp_path):
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "randose_jax.cli.predict",
          f"--workdir={tmp_path}",
          f"--patients={tmp_path}",
          f"--output={tmp_path / 'o'}",
      ],
      cwd=REPO,
      env=SUBPROCESS_ENV,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode != 0
  assert "no checkpoints/ folder" in proc.stderr


def test_conv_impl_override_same_predictions(trained, tmp_path):
  # The parameters are the same for every algorithm: restoring the run with
  # conv_impl='direct' or 'fft' must predict the same dose (float32 rounding).
  patient = openkbp.load_patient(
      trained / "synthetic" / "validation-pats" / "pt_5"
  )
  preds = {}
  for impl in ("direct", "fft"):
    restored = restore.restore_from_workdir(trained, "best", conv_impl=impl)
    assert restored.config.model.conv_impl == impl
    example = encoding.encode_patient(patient, restored.config.data)
    (preds[impl],) = restored.predictor.with_params(
        restored.params["model"]
    ).predict_local([example], False)
  scale = np.abs(preds["direct"]).max()
  assert scale > 0
  np.testing.assert_allclose(
      preds["fft"], preds["direct"], rtol=0, atol=1e-4 * scale
  )
  path = export.export_workdir(
      trained, tmp_path / "direct.zip", platforms=("cpu",), conv_impl="direct"
  )
  assert export.load(path).meta["conv_impl"] == "direct"
  with pytest.raises(ValueError, match="conv_impl: unknown 'winograd'"):
    restore.restore_from_workdir(trained, "best", conv_impl="winograd")


def _validation_patients(workdir):
  return [
      openkbp.load_patient(d)
      for d in openkbp.list_patient_dirs(
          workdir / "synthetic" / "validation-pats"
      )
  ]


def assert_export_predicts_as_the_library(artifact, restored, patients, tta):
  """The exported function on each patient's own arrays equals
  `predict_doses` (Gy) to float32 rounding; returns the doses."""
  loaded = export.load(artifact)
  got = [loaded.predict_patient(p) for p in patients]
  want = restored.predictor.with_params(restored.model_params).predict_doses(
      patients, tta
  )
  for a, b, p in zip(got, want, patients):
    assert a.shape == b.shape == tuple(loaded.meta["grid"])
    assert b.max() > 0 and a.min() >= 0
    assert not a[~p.possible_dose_mask].any()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * b.max())
  return got


@pytest.mark.parametrize("tta", [False, True])
def test_exported_model_equals_the_model(trained, tmp_path, tta):
  # The session run: whole grid, downsample 2 (16^3 patients, 8^3 model).
  path = export.export_workdir(trained, tmp_path / "model.zip", tta=tta)
  restored = restore.restore_from_workdir(trained, "best")
  assert restored.config.data.downsample == 2 and not restored.predictor.window
  meta = export.load(path).meta
  assert meta["grid"] == [16, 16, 16] and meta["format_version"] == 2
  assert set(meta["platforms"]) >= {"cpu"} and meta["tta"] == tta
  assert_export_predicts_as_the_library(
      path, restored, _validation_patients(trained), tta
  )


def readme_snippet() -> str:
  """The README's lines that run an artifact with only jax and numpy."""
  text = (REPO / "README.md").read_text()
  after = text.split("<!-- export-snippet -->", 1)[1]
  return after.split("```python\n", 1)[1].split("```", 1)[0]


def run_readme_snippet(artifact, patient, tmp_path) -> np.ndarray:
  """The README snippet in a process that cannot import randose_jax: no
  site processing (so no editable install), no PYTHONPATH, only the folder
  that holds jax and numpy on its path, in a folder of its own."""
  site = pathlib.Path(np.__file__).parents[1]
  assert pathlib.Path(jax.__file__).parents[1] == site
  work = tmp_path / "alone"
  work.mkdir()
  shutil.copy(artifact, work / "randose.zip")
  np.savez(
      work / "inputs.npz",
      ct_hu=patient.ct.astype(np.float32) - 1024,
      structure_masks=patient.structure_masks,
      possible_dose_mask=patient.possible_dose_mask,
      voxel_dimensions=patient.voxel_dimensions,
  )
  script = "\n".join(
      [
          "import sys",
          f"sys.path.append({str(site)!r})",
          "try:",
          "  import randose_jax",
          "  sys.exit('randose_jax is importable')",
          "except ImportError:",
          "  pass",
          "import numpy as np",
          "inputs = np.load('inputs.npz')",
          "ct_hu = inputs['ct_hu']",
          "structure_masks = inputs['structure_masks']",
          "possible_dose_mask = inputs['possible_dose_mask']",
          "voxel_dimensions = inputs['voxel_dimensions']",
          readme_snippet(),
          "np.save('dose.npy', dose_gy)",
          "assert 'randose_jax' not in sys.modules and 'flax' not in sys.modules",
      ]
  )
  (work / "run.py").write_text(script)
  env = {
      k: v
      for k, v in SUBPROCESS_ENV.items()
      if k != "PYTHONPATH" and not k.startswith("JAX_COMPILATION")
  }
  proc = subprocess.run(
      [sys.executable, "-I", "-S", "run.py"],
      cwd=work,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return np.load(work / "dose.npy")


def test_readme_snippet_runs_without_the_library(trained, tmp_path, capfd):
  path = tmp_path / "model.zip"
  code, out, err = run_in_process(
      "export",
      [f"--workdir={trained}", f"--output={path}", "--platforms=cpu"],
      capfd,
  )
  assert code == 0, err
  assert f"Exported {trained}" in out
  patient = _validation_patients(trained)[0]
  got = run_readme_snippet(path, patient, tmp_path)
  want = export.load(path).predict_patient(patient)
  np.testing.assert_array_equal(got, want)
  assert got.max() > 0


def test_export_load_rejects_a_bad_file(tmp_path):
  bad = tmp_path / "bad.zip"
  bad.write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="bad.zip: not a zip file"):
    export.load(bad)
  for version, age in ((1, "an older"), (3, "a newer")):
    old = tmp_path / f"v{version}.zip"
    with zipfile.ZipFile(old, "w") as zf:
      zf.writestr("meta.json", json.dumps({"format_version": version}))
      zf.writestr("params.msgpack", b"")
    with pytest.raises(
        ValueError,
        match=f"v{version}.zip: artifact format version {version} " f"\\({age}",
    ):
      export.load(old)
