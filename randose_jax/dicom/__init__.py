"""DICOM import (CT + RTSTRUCT [+ RTDOSE, RTPLAN] -> OpenKBP patient folders)
and the geometry that takes a prediction back to the patient's frame.

Modules: `roi_names` (clinic ROI names -> OpenKBP ROIs), `series` (scanning a
folder tree, grouping, CT and RT Dose volumes in the project's axis order),
`rasterize` (contours -> masks, occupancy resampling), `importer` (one plan ->
one patient folder), `geometry` (`dicom_geometry.json`), `synthetic` (DICOM
phantoms for tests and benchmarks). The command is `randose_jax.cli.dicom_import`.
"""

from randose_jax.data.openkbp import DataError


class DicomError(DataError):
  """Bad DICOM input; the message names the file and what is wrong with it."""
