"""Models shipped in the package (`randose_jax/inference/shipped.py`): a crop-trained
run with the distance channels ships, loads and predicts as its workdir
does; the real shipped model reproduces its recorded scores on the shared
validation patients through `predict` with no --workdir."""

import functools
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from randose_jax import checkpointing
from randose_jax.inference import export
from randose_jax.inference import restore
from randose_jax.inference import shipped
from randose_jax.training import train
from randose_jax.data import openkbp
from tests.test_fault_table import run_in_process
from tests.test_predict_export import assert_export_predicts_as_the_library
from tests.test_train import REPO
from tests.test_train import SUBPROCESS_ENV
from tests.test_train import tiny_config


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory):
  """A tiny run on 8^3 crops of 16^3 phantoms at full resolution, with the
  PTV distance channels: the cpu_best recipe's code paths."""
  workdir = tmp_path_factory.mktemp("crop_run")
  config = tiny_config(
      **{
          "data.downsample": 1,
          "data.crop_shape": (8, 8, 8),
          "data.geometry": True,
          "ema_decay": 0.9,
      }
  )
  train.train_and_evaluate(
      config, workdir, mesh=train.make_mesh(jax.devices()[:1])
  )
  return workdir


def test_crop_run_ships_and_predicts_as_its_workdir(
    crop_run, tmp_path, monkeypatch, capfd
):
  root = tmp_path / "models"
  out = shipped.ship(crop_run, "tiny", {"recipe": "test"}, root=root)
  assert shipped.available(root) == ["tiny"]
  assert shipped.default_name(root) == "tiny"
  meta = shipped.card("tiny", root)
  assert meta["recipe"] == "test" and meta["ema"] is True
  assert meta["params_bytes"] == (out / shipped.PARAMS_FILE).stat().st_size
  got = shipped.load("tiny", root=root)
  want = restore.restore_from_workdir(crop_run)
  assert got.uses_ema and got.predictor.window == (8, 8, 8)
  patients = [
      openkbp.load_patient(d)
      for d in openkbp.list_patient_dirs(
          crop_run / "synthetic" / "validation-pats"
      )
  ]
  for a, b in zip(
      got.predictor.predict_doses(patients),
      want.predictor.predict_doses(patients),
  ):
    np.testing.assert_array_equal(a, b)
    assert a.max() > 0
  # Exported standalone: the patient's arrays in, Gy out, with the windows
  # over the mask's box and the distance channels computed inside.
  artifact = export.export_restored(got, tmp_path / "tiny.zip")
  loaded = export.load(artifact)
  assert loaded.meta["grid"] == [16, 16, 16]
  assert loaded.meta["window"] == [8, 8, 8] and loaded.meta["geometry"]
  assert_export_predicts_as_the_library(artifact, got, patients, tta=False)
  # The command exports a shipped model the same way.
  monkeypatch.setattr(
      shipped, "load", functools.partial(shipped.load, root=root)
  )
  code, _, err = run_in_process(
      "export", ["--model=tiny", f"--output={tmp_path / 'cli.zip'}"], capfd
  )
  assert code == 0, err
  assert export.load(tmp_path / "cli.zip").meta["window"] == [8, 8, 8]
  # Not replaced without asking; a damaged file is named.
  with pytest.raises(FileExistsError):
    shipped.ship(crop_run, "tiny", {}, root=root)
  blob = bytearray((out / shipped.PARAMS_FILE).read_bytes())
  blob[-1] ^= 1
  (out / shipped.PARAMS_FILE).write_bytes(bytes(blob))
  with pytest.raises(checkpointing.CheckpointError, match="SHA-256"):
    shipped.load("tiny", root=root)


def test_unknown_model_is_a_clear_error(tmp_path):
  with pytest.raises(shipped.ConfigError, match="no shipped model"):
    shipped.default_name(tmp_path)
  with pytest.raises(shipped.ConfigError, match="no such shipped model"):
    shipped.folder("nope", tmp_path / "x")


def _predict_with(name, patients, output, *flags):
  """`predict --model=name` (no --workdir) in a fresh process; it must
  succeed and say it used the shipped model."""
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "randose_jax.cli.predict",
          f"--model={name}",
          f"--patients={patients}",
          f"--output={output}",
          *flags,
      ],
      cwd=REPO,
      env=SUBPROCESS_ENV,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"shipped model {name}" in proc.stdout
  return proc


@pytest.mark.parametrize("name", shipped.available() or ["(none shipped)"])
def test_shipped_model_reproduces_its_recorded_scores(
    name, shared_openkbp, tmp_path
):
  """`predict` without --workdir, on the 6 shared validation patients: the
  scores the card records (dose, DVH), the parameters within the size a
  package may carry."""
  assert name in shipped.available(), "no model is shipped in the package"
  meta = shipped.card(name)
  assert meta["params_bytes"] <= shipped.MAX_PARAM_BYTES
  recorded = meta["shared_validation"]
  patients = shared_openkbp / "validation-pats"
  assert sorted(recorded["patients"]) == sorted(
      d.name for d in openkbp.list_patient_dirs(patients)
  )
  proc = _predict_with(name, patients, tmp_path / "preds")
  summary = json.loads(proc.stdout.splitlines()[-1])
  assert summary["dose_score"] == pytest.approx(
      recorded["dose_score"], rel=1e-3
  )
  assert summary["dvh_score"] == pytest.approx(recorded["dvh_score"], rel=1e-3)


@pytest.mark.parametrize("name", shipped.available() or ["(none shipped)"])
def test_shipped_model_predicts_a_dicom_import(name, tmp_path):
  """A clinic's DICOM (synthetic here) imported, then `predict` with no
  --workdir: the shipped model writes an RT Dose in the patient's frame,
  zero outside the possible-dose mask and highest in the PTV70."""
  import pydicom  # pylint: disable=g-import-not-at-top

  from randose_jax.dicom import importer  # pylint: disable=g-import-not-at-top
  from randose_jax.dicom import synthetic  # pylint: disable=g-import-not-at-top

  assert name in shipped.available(), "no model is shipped in the package"
  record = synthetic.write_patient(
      tmp_path / "export",
      shape=(40, 64, 64),
      spacing=(4.0, 2.5, 2.5),
      patient_id="DCM001",
  )
  importer.import_folder(tmp_path / "export", tmp_path / "pats", progress=False)
  out = tmp_path / "preds"
  _predict_with(name, tmp_path / "pats", out, "--formats=csv,dicom")
  patient = openkbp.load_patient(tmp_path / "pats" / "pt_DCM001")
  dose = openkbp.read_prediction_csv(out / "pt_DCM001.csv", patient.grid_shape)
  mask = patient.possible_dose_mask
  assert np.isfinite(dose).all() and not dose[~mask].any()
  ptv70 = patient.structure_masks[..., openkbp.ROI_NAMES.index("PTV70")]
  assert ptv70.any(), "the import lost the PTV70"
  outside = mask & ~patient.structure_masks[..., -3:].any(-1)
  # The model puts the high dose on the target: its mean in the PTV70 is
  # near the prescription and well above the rest of the body's.
  assert 50 < dose[ptv70].mean() < 85, dose[ptv70].mean()
  assert dose[ptv70].mean() > 2 * dose[outside].mean()
  ds = pydicom.dcmread(out / "pt_DCM001.dcm")
  assert ds.Modality == "RTDOSE"
  assert ds.FrameOfReferenceUID == record["uids"]["frame"]
