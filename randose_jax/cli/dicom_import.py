r"""Imports a clinic's DICOM (CT + RTSTRUCT [+ RTPLAN, RTDOSE]) as OpenKBP
patient folders.

  python -m randose_jax.cli.dicom_import --input=DICOM_DIR --output=PATIENTS_DIR \
      [--roi_map=map.json] [--ptv_doses=PTV_high=70,PTV_low=56] \
      [--spacing=3.90625,3.90625,2.5] [--grid_shape=128,128,128] \
      [--overwrite] [--progress=false]

--input is scanned recursively (any file names; several patients, studies
and series mixed). Each RTSTRUCT is paired with the CT series it references,
and with each RTPLAN referencing it and that plan's RTDOSE; each plan
becomes `--output/pt_<PatientID>[_k]/` with ct.csv, the ROI files,
possible_dose_mask.csv, voxel_dimensions.csv, dose.csv (when an RTDOSE
exists) and dicom_geometry.json (the way back: `predict --formats=dicom`).
See randose_jax/dicom/importer.py for the grid placement and
randose_jax/dicom/roi_names.py for the names and the --roi_map format.

Nothing is written until every plan has been read and converted; a bad input
is one `error:` line naming the file (exit 2). A summary table (patient, ROIs
found and mapped, PTV volume cut by the box, possible-dose mask source,
warnings) is printed at the end. The progress goes to stderr
(`randose_jax/progress.py`): a live line on a terminal (plans done / total,
time left), one line per patient folder elsewhere or with --progress=false:

  dicom_import: 2/5 pt_1234 done, 6.1 s/patient, about 18 s left
"""

from absl import app
from absl import flags

from randose_jax.cli import common as cli
from randose_jax.conventions import GRID_SHAPE
from randose_jax.default_config import ConfigError

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS):
  """Command-line flags (defined only when run as a program)."""
  flags.DEFINE_string(
      "input", None, "Folder tree of DICOM files.", flag_values=flag_values
  )
  flags.DEFINE_string(
      "output",
      None,
      "Folder for the pt_* patient folders.",
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      "roi_map",
      None,
      "JSON (or YAML) map: structure name or "
      "re:REGEX -> OpenKBP ROI name, Body, or null.",
      flag_values=flag_values,
  )
  flags.DEFINE_list(
      "ptv_doses",
      [],
      "NAME=Gy pairs: the dose level of PTVs whose names carry none.",
      flag_values=flag_values,
  )
  flags.DEFINE_list(
      "spacing",
      ["3.90625", "3.90625", "2.5"],
      "Voxel size (mm) "
      "along axes 0 (anterior-posterior), 1 (right-left), "
      "2 (superior-inferior).",
      flag_values=flag_values,
  )
  flags.DEFINE_list(
      "grid_shape",
      [str(n) for n in GRID_SHAPE],
      "Voxels per axis (the model expects 128,128,128).",
      flag_values=flag_values,
  )
  flags.DEFINE_bool(
      "overwrite",
      False,
      "Replace patient folders already in --output.",
      flag_values=flag_values,
  )
  cli.define_progress_flag(flag_values)


def _numbers(name: str, values, kind, count: int = 3):
  try:
    out = [kind(v) for v in values]
  except ValueError:
    out = []
  if len(out) != count or not all(v > 0 for v in out):
    raise ConfigError(
        f"--{name}={','.join(values)}: expected {count} positive "
        f"{'integers' if kind is int else 'numbers'}"
    )
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("input", "output"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  spacing = _numbers("spacing", FLAGS.spacing, float)
  shape = _numbers("grid_shape", FLAGS.grid_shape, int)
  from randose_jax.dicom import importer, roi_names  # pylint: disable=g-import-not-at-top

  mapper = roi_names.RoiMapper(
      roi_names.load_roi_map(FLAGS.roi_map) if FLAGS.roi_map else None,
      roi_names.parse_ptv_doses(FLAGS.ptv_doses),
  )
  rows = importer.import_folder(
      FLAGS.input,
      FLAGS.output,
      mapper,
      shape=shape,
      spacing=spacing,
      overwrite=FLAGS.overwrite,
      progress=FLAGS.progress,
  )
  print(importer.summary_table(rows))
  print(f"{len(rows)} patient folder(s) written to {FLAGS.output}")


def run() -> None:
  """The console command (pyproject [project.scripts])."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
