"""Tests for randose_jax.formats: NIfTI and DICOM RT Dose round trips."""

import numpy as np
import pydicom
import pytest

from randose_jax import formats
from tests import helpers

SHAPE = (12, 16, 20)
VOXEL_DIMENSIONS = (2.5, 3.1, 1.5)
HOT = (3, 11, 4)  # An asymmetric index: orientation errors move it.


@pytest.fixture
def dose():
  rng = np.random.default_rng(0)
  d = rng.uniform(0.0, 60.0, SHAPE)
  d[0, 0, 0] = 0.0
  d[HOT] = 72.5
  return d


def _assert_hot(volume):
  assert np.unravel_index(np.argmax(volume), volume.shape) == HOT


def test_nifti_round_trip(dose, tmp_path):
  path = formats.write_nifti(tmp_path / 'pt_1.nii.gz', dose, VOXEL_DIMENSIONS)
  back, vd = helpers.read_nifti(path)
  assert back.shape == SHAPE
  np.testing.assert_array_equal(back, dose.astype(np.float32))
  np.testing.assert_allclose(vd, VOXEL_DIMENSIONS, rtol=1e-6)
  _assert_hot(back)


def test_nifti_header(dose, tmp_path):
  nib = pytest.importorskip('nibabel')
  img = nib.load(
      formats.write_nifti(tmp_path / 'a.nii', dose, VOXEL_DIMENSIONS)
  )
  assert img.get_data_dtype() == np.float32
  assert img.header.get_xyzt_units()[0] == 'mm'
  assert int(img.header['sform_code']) > 0 and int(img.header['qform_code']) > 0
  np.testing.assert_allclose(
      img.header.get_zooms(), VOXEL_DIMENSIONS, rtol=1e-6
  )
  # Array axes are NIfTI i, j, k; anatomically posterior, patient left, inferior.
  assert nib.aff2axcodes(img.affine) == ('P', 'L', 'I')
  np.testing.assert_allclose(img.affine, img.get_qform(), atol=1e-4)
  _assert_hot(np.asarray(img.dataobj))


def test_nifti_reads_other_orientations(dose, tmp_path):
  """A file stored in RAS+ order comes back in the project's axis order."""
  nib = pytest.importorskip('nibabel')
  ras = np.transpose(dose, (1, 0, 2))[::-1, ::-1, ::-1]  # i: R, j: A, k: S
  affine = np.diag(
      [VOXEL_DIMENSIONS[1], VOXEL_DIMENSIONS[0], VOXEL_DIMENSIONS[2], 1.0]
  )
  nib.save(
      nib.Nifti1Image(ras.astype(np.float32), affine),
      str(tmp_path / 'ras.nii.gz'),
  )
  back, vd = helpers.read_nifti(tmp_path / 'ras.nii.gz')
  np.testing.assert_array_equal(back, dose.astype(np.float32))
  np.testing.assert_allclose(vd, VOXEL_DIMENSIONS, rtol=1e-6)


@pytest.mark.parametrize('bits', [16, 32])
def test_rtdose_round_trip(dose, tmp_path, bits):
  path = formats.write_rtdose(
      tmp_path / 'pt_1.dcm', dose, VOXEL_DIMENSIONS, 'pt_1', bits_allocated=bits
  )
  back, vd = formats.read_rtdose(path)
  ds = pydicom.dcmread(path)
  scaling = float(ds.DoseGridScaling)
  assert back.shape == SHAPE
  assert np.abs(back - dose).max() <= scaling / 2 * (1 + 1e-9)
  # The maximum dose uses the top of the integer range.
  assert 0.99 * (2**bits - 1) <= dose.max() / scaling <= 2**bits - 1
  np.testing.assert_allclose(vd, VOXEL_DIMENSIONS, rtol=1e-12)
  _assert_hot(back)


def test_rtdose_tags(dose, tmp_path):
  path = formats.write_rtdose(
      tmp_path / 'd.dcm', dose, VOXEL_DIMENSIONS, 'pt_7'
  )
  ds = pydicom.dcmread(path)
  assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
  assert ds.file_meta.MediaStorageSOPClassUID == formats.RT_DOSE_STORAGE
  assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
  assert ds.SOPClassUID == '1.2.840.10008.5.1.4.1.1.481.2'
  assert ds.Modality == 'RTDOSE'
  assert (ds.DoseUnits, ds.DoseType, ds.DoseSummationType) == (
      'GY',
      'PHYSICAL',
      'PLAN',
  )
  assert ds.PatientID == 'pt_7' and str(ds.PatientName) == 'pt_7'
  assert (ds.Rows, ds.Columns, ds.NumberOfFrames) == SHAPE
  assert ds.FrameIncrementPointer == pydicom.tag.Tag(0x3004, 0x000C)
  assert [float(v) for v in ds.PixelSpacing] == [2.5, 3.1]
  assert float(ds.SliceThickness) == 1.5
  np.testing.assert_allclose(
      [float(v) for v in ds.GridFrameOffsetVector], np.arange(20) * 1.5
  )
  assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
  assert len(ds.ImagePositionPatient) == 3
  assert ds.PixelRepresentation == 0 and ds.BitsAllocated == ds.BitsStored == 32
  for keyword in (
      'StudyInstanceUID',
      'SeriesInstanceUID',
      'FrameOfReferenceUID',
  ):
    assert pydicom.uid.UID(ds[keyword].value).is_valid, keyword
  assert 'ReferencedRTPlanSequence' not in ds
  assert ds.pixel_array.shape == (20, 12, 16)


def test_rtdose_uids_shared_per_patient(dose, tmp_path):
  a = pydicom.dcmread(
      formats.write_rtdose(tmp_path / 'a.dcm', dose, VOXEL_DIMENSIONS, 'pt_1')
  )
  b = pydicom.dcmread(
      formats.write_rtdose(tmp_path / 'b.dcm', dose, VOXEL_DIMENSIONS, 'pt_1')
  )
  c = pydicom.dcmread(
      formats.write_rtdose(tmp_path / 'c.dcm', dose, VOXEL_DIMENSIONS, 'pt_2')
  )
  assert a.FrameOfReferenceUID == b.FrameOfReferenceUID != c.FrameOfReferenceUID
  assert a.StudyInstanceUID == b.StudyInstanceUID != c.StudyInstanceUID
  assert a.SOPInstanceUID != b.SOPInstanceUID
  plan = pydicom.uid.generate_uid()
  d = pydicom.dcmread(
      formats.write_rtdose(
          tmp_path / 'd.dcm',
          dose,
          VOXEL_DIMENSIONS,
          'pt_1',
          frame_of_reference_uid='1.2.3.4',
          study_instance_uid='1.2.3.5',
          series_instance_uid='1.2.3.6',
          referenced_rt_plan_uid=plan,
      )
  )
  assert (d.FrameOfReferenceUID, d.StudyInstanceUID, d.SeriesInstanceUID) == (
      '1.2.3.4',
      '1.2.3.5',
      '1.2.3.6',
  )
  assert d.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan


def test_rtdose_geometry_matches_nifti(dose, tmp_path):
  """Both files put voxel HOT at the same patient position (LPS = RAS with x, y negated)."""
  nib = pytest.importorskip('nibabel')
  ds = pydicom.dcmread(
      formats.write_rtdose(tmp_path / 'a.dcm', dose, VOXEL_DIMENSIONS, 'p')
  )
  img = nib.load(
      formats.write_nifti(tmp_path / 'a.nii.gz', dose, VOXEL_DIMENSIONS)
  )
  frame = SHAPE[2] - 1 - HOT[2]  # Frames run inferior -> superior.
  row, col = HOT[0], HOT[1]
  ipp = np.array([float(v) for v in ds.ImagePositionPatient])
  dicom_lps = ipp + [
      col * 3.1,
      row * 2.5,
      float(ds.GridFrameOffsetVector[frame]),
  ]
  nifti_ras = img.affine @ [*HOT, 1]
  np.testing.assert_allclose(dicom_lps, nifti_ras[:3] * [-1, -1, 1], atol=1e-3)
  assert ds.pixel_array[frame, row, col] == ds.pixel_array.max()
  # Default geometry: the grid centre at the origin.
  centre = formats.index_to_lps_matrix(SHAPE, VOXEL_DIMENSIONS) @ [
      *((np.array(SHAPE) - 1) / 2),
      1,
  ]
  np.testing.assert_allclose(centre[:3], 0, atol=1e-9)


def test_rtdose_reads_reversed_frames(dose, tmp_path):
  """A file written superior-first (negative offsets) reads back the same."""
  path = formats.write_rtdose(tmp_path / 'a.dcm', dose, VOXEL_DIMENSIONS, 'p')
  ds = pydicom.dcmread(path)
  frames = ds.pixel_array[::-1]
  ds.PixelData = np.ascontiguousarray(frames).astype('<u4').tobytes()
  ds.GridFrameOffsetVector = [f'{-1.5 * i:g}' for i in range(SHAPE[2])]
  ipp = [float(v) for v in ds.ImagePositionPatient]
  ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 1.5 * (SHAPE[2] - 1)]
  ds.save_as(tmp_path / 'b.dcm')
  back, vd = formats.read_rtdose(tmp_path / 'b.dcm')
  assert np.abs(back - dose).max() <= float(ds.DoseGridScaling)
  np.testing.assert_allclose(vd, VOXEL_DIMENSIONS)


@pytest.mark.parametrize(
    'iop',
    [
        (-1, 0, 0, 0, 1, 0),
        (-1, 0, 0, 0, -1, 0),
        (1, 0, 0, 0, -1, 0),  # FFS, HFP, FFP
        (0, 1, 0, 0, 0, -1),
        (1, 0, 0, 0, 0, -1),
    ],
)  # sagittal, coronal
def test_rtdose_in_another_orientation(dose, tmp_path, iop):
  """`image_orientation_patient`: the file has that IOP, frames along its
  normal at increasing offsets, and every voxel where index_to_lps_matrix
  puts it; read_rtdose gives the array back."""
  origin = (10.0, -20.0, 30.0)
  path = formats.write_rtdose(
      tmp_path / 'o.dcm',
      dose,
      VOXEL_DIMENSIONS,
      'p',
      origin_lps_mm=origin,
      image_orientation_patient=iop,
  )
  ds = pydicom.dcmread(path)
  assert [float(v) for v in ds.ImageOrientationPatient] == [
      float(v) for v in iop
  ]
  back, vd = formats.read_rtdose(path)
  assert np.abs(back - dose).max() <= float(ds.DoseGridScaling) / 2 * (1 + 1e-9)
  np.testing.assert_allclose(vd, VOXEL_DIMENSIONS, rtol=1e-12)
  row, col = np.array(iop[:3], float), np.array(iop[3:], float)
  offsets = np.array([float(v) for v in ds.GridFrameOffsetVector])
  assert offsets[0] == 0 and np.all(np.diff(offsets) > 0)
  frame, r, c = np.unravel_index(
      np.argmax(ds.pixel_array), ds.pixel_array.shape
  )
  lps = (
      np.array([float(v) for v in ds.ImagePositionPatient])
      + offsets[frame] * np.cross(row, col)
      + r * float(ds.PixelSpacing[0]) * col
      + c * float(ds.PixelSpacing[1]) * row
  )
  expected = formats.index_to_lps_matrix(SHAPE, VOXEL_DIMENSIONS, origin) @ [
      *HOT,
      1,
  ]
  np.testing.assert_allclose(lps, expected[:3], atol=1e-3)


def test_rtdose_refuses_an_oblique_orientation(dose, tmp_path):
  c, s = np.cos(0.3), np.sin(0.3)
  with pytest.raises(ValueError, match='o.dcm.*not axis-aligned'):
    formats.write_rtdose(
        tmp_path / 'o.dcm',
        dose,
        VOXEL_DIMENSIONS,
        'p',
        image_orientation_patient=(c, s, 0, -s, c, 0),
    )
  assert not list(tmp_path.iterdir())


def test_zero_dose(tmp_path):
  zeros = np.zeros((2, 3, 4))
  back, _ = formats.read_rtdose(
      formats.write_rtdose(tmp_path / 'z.dcm', zeros, (1, 1, 1), 'p')
  )
  np.testing.assert_array_equal(back, zeros)


def test_write_prediction_formats(dose, tmp_path):
  paths = formats.write_prediction_formats(
      tmp_path / 'out', 'pt_9', dose, VOXEL_DIMENSIONS
  )
  assert [p.name for p in paths] == ['pt_9.nii.gz', 'pt_9.dcm']
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == [
      'pt_9.dcm',
      'pt_9.nii.gz',
  ]
  # Existing files are never replaced silently, and nothing is half-written.
  before = paths[1].read_bytes()
  with pytest.raises(FileExistsError, match='pt_9'):
    formats.write_prediction_formats(
        tmp_path / 'out', 'pt_9', dose * 0.5, VOXEL_DIMENSIONS
    )
  assert paths[1].read_bytes() == before
  with pytest.raises(FileExistsError, match='pt_9.dcm'):
    formats.write_rtdose(paths[1], dose, VOXEL_DIMENSIONS, 'pt_9')
  formats.write_prediction_formats(
      tmp_path / 'out',
      'pt_9',
      dose * 0.5,
      VOXEL_DIMENSIONS,
      formats=('dicom',),
      overwrite=True,
  )
  back, _ = formats.read_rtdose(paths[1])
  np.testing.assert_allclose(back, dose * 0.5, atol=1e-6)
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == [
      'pt_9.dcm',
      'pt_9.nii.gz',
  ]
  with pytest.raises(ValueError, match='formats'):
    formats.write_prediction_formats(
        tmp_path, 'pt_9', dose, VOXEL_DIMENSIONS, formats=('png',)
    )


@pytest.mark.parametrize('writer', ['nifti', 'dicom'])
def test_bad_input_errors_name_the_file(dose, tmp_path, writer):
  def write(d, vd=VOXEL_DIMENSIONS):
    if writer == 'nifti':
      return formats.write_nifti(tmp_path / 'bad.nii.gz', d, vd)
    return formats.write_rtdose(tmp_path / 'bad.dcm', d, vd, 'p')

  nan = dose.copy()
  nan[1, 2, 3] = np.nan
  negative = dose.copy()
  negative[0, 0, 0] = -1.0
  for bad, message in (
      (dose[0], 'shape'),
      (nan, 'NaN'),
      (negative, 'negative'),
  ):
    with pytest.raises(ValueError, match=rf'bad\..*{message}'):
      write(bad)
  with pytest.raises(ValueError, match='voxel_dimensions'):
    write(dose, (1.0, 0.0, 1.0))
  assert not list(tmp_path.iterdir())


def test_bad_names(dose, tmp_path):
  with pytest.raises(ValueError, match='.nii'):
    formats.write_nifti(tmp_path / 'x.img', dose, VOXEL_DIMENSIONS)
  with pytest.raises(ValueError, match='patient_id'):
    formats.write_rtdose(tmp_path / 'x.dcm', dose, VOXEL_DIMENSIONS, '')
  with pytest.raises(ValueError, match='not a readable DICOM'):
    (tmp_path / 'junk.dcm').write_bytes(b'not dicom')
    formats.read_rtdose(tmp_path / 'junk.dcm')
