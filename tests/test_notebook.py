"""The quickstart notebook runs top to bottom (smoke settings) and plots."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip(
    "nbformat", reason="nbformat is needed to run notebooks/quickstart.ipynb"
)
nbclient = pytest.importorskip(
    "nbclient", reason="nbclient is needed to run notebooks/quickstart.ipynb"
)
pytest.importorskip(
    "ipykernel",
    reason="ipykernel (the python3 kernel) is needed to run "
    "notebooks/quickstart.ipynb",
)

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def _load_demo_config(variant):
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location(
      "demo_config", REPO / "configs" / "demo.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def test_smoke_variant_is_tiny_and_the_default_is_not():
  # tests/test_train.py trains on exactly this variant (tiny_config).
  smoke, default = _load_demo_config("smoke"), _load_demo_config("")
  assert smoke.num_train_steps < default.num_train_steps
  assert smoke.data.synthetic_grid < default.data.synthetic_grid
  assert len(smoke.model.widths) < len(default.model.widths)
  with pytest.raises(ValueError, match="unknown variant"):
    _load_demo_config("nope")


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.source[:80]


def test_quickstart_runs_on_smoke_settings(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = tmp_path / "work"
  env = dict(
      os.environ,
      RANDOSE_SMOKE="1",
      RANDOSE_NOTEBOOK_WORKDIR=str(workdir),
      PYTHONPATH=os.pathsep.join(
          filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
      ),
      # Quick compiles, like the rest of the suite (conftest.py).
      JAX_DISABLE_MOST_OPTIMIZATIONS="true",
      JAX_PLATFORMS="cpu",
      MPLBACKEND="Agg",
  )
  env.pop("OPENKBP_DIR", None)  # the phantom path, whatever the shell holds
  client = nbclient.NotebookClient(
      nb,
      kernel_name="python3",
      timeout=600,
      resources={"metadata": {"path": str(tmp_path)}},
  )
  client.execute(env=env)  # raises CellExecutionError on any failing cell

  plots = workdir / "plots"
  names = {p.name for p in plots.glob("*.png")}
  assert "pt_1_inputs.png" in names
  for pid in ("pt_5", "pt_6"):  # the smoke variant's two validation phantoms
    assert {f"{pid}_slices.png", f"{pid}_dvh.png"} <= names
  assert sorted(p.name for p in (workdir / "predictions").glob("pt_*.csv")) == [
      "pt_5.csv",
      "pt_6.csv",
  ]
  outputs = [
      o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
  ]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 3  # the inputs, the slice view and the DVH
  text = "".join(
      o.get("text", "") for o in outputs if o.output_type == "stream"
  )
  assert "dose score: " in text and "DVH score: " in text
  # The DICOM section: imported, predicted, written as an RT Dose in the
  # CT's frame and orientation (feet-first supine).
  assert (workdir / "dicom" / "predictions" / "pt_DEMO001.dcm").is_file()
  assert "same frame of reference as the CT: True" in text
  assert "ImageOrientationPatient [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]" in text
  assert not list(tmp_path.glob("randose_jax_repo"))  # nothing cloned
