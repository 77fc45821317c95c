"""Plots of predicted dose: slice views over CT and dose-volume histograms.

Pure matplotlib object API (`matplotlib.figure.Figure` rendered by Agg): no
pyplot, no global backend switch, nothing shown on screen; safe in scripts,
notebooks and worker threads.

Arrays follow the project's grid axes (docs/design.md section 1): axis 0 anterior ->
posterior, axis 1 patient right -> left (the assumption lives in
`formats.AXIS_DIRECTIONS_LPS`; the orientation labels here follow it), axis 2
superior -> inferior. Views use the radiological convention: axial and
coronal with the patient's right on the viewer's left, axial with anterior
up, coronal and sagittal with superior up, sagittal with anterior on the left.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib import patheffects

from randose_jax.conventions import AXIS_DIRECTIONS_LPS, CT_OFFSET
from randose_jax.conventions import ROI_NAMES as DEFAULT_ROI_NAMES

# One colour per ROI channel, the same in slice contours and DVH curves. Chosen
# to stay apart from each other; on the slices every line gets a black outline
# so it stays visible over the rainbow dose wash and the grey CT.
ROI_COLOURS = {
    'Brainstem': '#1f77b4',
    'SpinalCord': '#17becf',
    'RightParotid': '#2ca02c',
    'LeftParotid': '#bcbd22',
    'Esophagus': '#8c564b',
    'Larynx': '#9467bd',
    'Mandible': '#404040',
    'PTV56': '#ff7f0e',
    'PTV63': '#e377c2',
    'PTV70': '#d62728',
}
_FALLBACK_COLOURS = colormaps['tab20'].colors

CT_WINDOW_HU = (-160.0, 240.0)  # Soft-tissue window: level 40, width 400.
DOSE_CMAP = 'turbo'
DIFF_CMAP = 'RdBu_r'  # Red: prediction above reference.
GAMMA_CMAP = 'RdBu_r'  # Blue: passes (gamma < 1), white at 1, red: fails.
GAMMA_MAX = 2.0
DOSE_WASH_THRESHOLD = (
    0.05  # Fraction of the maximum dose below which the wash is transparent.
)
DOSE_WASH_ALPHA = 0.55

# Letters at the low and high end of an array axis, from its LPS direction.
_WORLD_LETTERS = (
    ('R', 'L'),
    ('A', 'P'),
    ('I', 'S'),
)  # LPS x, y, z: (negative end, positive end)


def _axis_letters(axis: int) -> tuple[str, str]:
  """(letter at index 0, letter at the last index) of array axis 0, 1 or 2."""
  direction = AXIS_DIRECTIONS_LPS[axis]
  world = int(np.argmax(np.abs(direction)))
  low, high = _WORLD_LETTERS[world]
  return (low, high) if direction[world] > 0 else (high, low)


# The three views: plane axis; (vertical array axis, letter wanted at the top);
# (horizontal array axis, letter wanted on the left).
_VIEWS = (
    ('Axial', 2, (0, 'A'), (1, 'R')),
    ('Coronal', 0, (2, 'S'), (1, 'R')),
    ('Sagittal', 1, (2, 'S'), (0, 'A')),
)


def _roi_colour(name: str, channel: int) -> str:
  return ROI_COLOURS.get(
      name, _FALLBACK_COLOURS[channel % len(_FALLBACK_COLOURS)]
  )


def _check_grid(name: str, array, shape, path) -> np.ndarray:
  array = np.asarray(array)
  if array.shape != tuple(shape):
    raise ValueError(
        f'{path}: {name} has shape {array.shape}, expected {tuple(shape)}'
    )
  return array


def _check_masks(structure_masks, shape, roi_names, path) -> np.ndarray:
  masks = np.asarray(structure_masks)
  expected = (*shape, len(roi_names))
  if masks.shape != expected:
    raise ValueError(
        f'{path}: structure_masks has shape {masks.shape}, expected {expected} '
        f'(one channel per name in {list(roi_names)})'
    )
  return masks.astype(bool)


def _save(fig: Figure, path: Path, dpi: int) -> Path:
  """Writes `fig` as a PNG at `path` (parent folders are created)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=dpi, facecolor='white')
  return path


def _is_target(name: str) -> bool:
  return name.upper().startswith(('PTV', 'CTV', 'GTV'))


def slice_centre(
    structure_masks, dose, roi_names: Sequence[str] = DEFAULT_ROI_NAMES
) -> tuple[int, int, int]:
  """The voxel (axis 0, 1, 2) the slice views pass through.

  Args:
    structure_masks: bool (D,H,W,R) in the order of `roi_names`.
    dose: (D,H,W) Gy, used when no target is contoured.
    roi_names: the R channel names; targets are those starting with PTV/CTV/GTV.

  Returns:
    The rounded centroid of the union of target masks, or the dose maximum.
  """
  targets = [c for c, name in enumerate(roi_names) if _is_target(name)]
  union = np.any(structure_masks[..., targets], axis=-1) if targets else None
  if union is not None and union.any():
    return tuple(int(round(c)) for c in np.argwhere(union).mean(axis=0))
  return tuple(
      int(i) for i in np.unravel_index(int(np.argmax(dose)), dose.shape)
  )


def _view_slice(volume, view, centre) -> np.ndarray:
  """2-D display image (rows top -> bottom, columns left -> right) of one view."""
  _, plane_axis, (v_axis, top), (h_axis, left) = view
  image = np.take(volume, centre[plane_axis], axis=plane_axis)
  # `image` keeps the two remaining axes in increasing order; make rows = v_axis.
  if v_axis > h_axis:
    image = image.T
  if _axis_letters(v_axis)[0] != top:
    image = image[::-1]
  if _axis_letters(h_axis)[0] != left:
    image = image[:, ::-1]
  return image


def _view_box(
    view,
    centre,
    shape,
    voxel_dimensions,
    regions,
    margin_mm=12.0,
    aspect_range=(0.55, 1.35),
) -> tuple[float, float, float, float]:
  """Display box (x0, x1, y0, y1) in mm that zooms a view onto its content.

  The box bounds the union of the 2-D `regions` (display images of the view)
  plus a margin, padded so that height / width stays within `aspect_range`
  (panels of a 3x3 grid then have similar sizes). The full field if empty.
  """
  _, _, (v_axis, _), (h_axis, _) = view
  sv, sh = voxel_dimensions[v_axis], voxel_dimensions[h_axis]
  height_mm, width_mm = shape[v_axis] * sv, shape[h_axis] * sh
  union = np.zeros_like(regions[0], dtype=bool)
  for region in regions:
    union |= region
  if not union.any():
    return 0.0, width_mm, 0.0, height_mm
  rows, cols = np.nonzero(union)
  y0 = max(rows.min() * sv - margin_mm, 0.0)
  y1 = min((rows.max() + 1) * sv + margin_mm, height_mm)
  x0 = max(cols.min() * sh - margin_mm, 0.0)
  x1 = min((cols.max() + 1) * sh + margin_mm, width_mm)
  ratio = (y1 - y0) / (x1 - x0)
  if ratio < aspect_range[0]:
    pad = (aspect_range[0] * (x1 - x0) - (y1 - y0)) / 2
    y0, y1 = y0 - pad, y1 + pad
  elif ratio > aspect_range[1]:
    pad = ((y1 - y0) / aspect_range[1] - (x1 - x0)) / 2
    x0, x1 = x0 - pad, x1 + pad
  return x0, x1, y0, y1


def _outlined(**kwargs):
  return dict(
      path_effects=[patheffects.withStroke(linewidth=2.0, foreground='black')],
      **kwargs,
  )


def _draw_panel(
    ax,
    view,
    centre,
    shape,
    voxel_dimensions,
    box,
    ct_hu,
    overlay,
    overlay_kwargs,
    masks,
    roi_names,
    present,
    scale_bar: bool,
):
  _, _, (v_axis, top), (h_axis, left) = view
  height_mm = shape[v_axis] * voxel_dimensions[v_axis]
  width_mm = shape[h_axis] * voxel_dimensions[h_axis]
  extent = (0.0, width_mm, height_mm, 0.0)  # mm; rows grow downwards.

  ax.imshow(
      _view_slice(ct_hu, view, centre),
      cmap='gray',
      vmin=CT_WINDOW_HU[0],
      vmax=CT_WINDOW_HU[1],
      extent=extent,
      interpolation='nearest',
  )
  image = ax.imshow(
      overlay, extent=extent, interpolation='nearest', **overlay_kwargs
  )

  # Pixel-centre coordinates for the contours, in the same mm frame.
  ys = (np.arange(shape[v_axis]) + 0.5) * voxel_dimensions[v_axis]
  xs = (np.arange(shape[h_axis]) + 0.5) * voxel_dimensions[h_axis]
  for channel, name in enumerate(roi_names):
    if not present[channel]:
      continue
    mask = _view_slice(masks[..., channel], view, centre)
    if mask.any() and not mask.all():
      width = 1.5 if _is_target(name) else 1.2
      # A dark outline keeps each line readable over a dose wash of the same hue.
      ax.contour(
          xs,
          ys,
          mask.astype(np.float32),
          levels=[0.5],
          colors=[_roi_colour(name, channel)],
          linewidths=width,
          path_effects=[
              patheffects.withStroke(linewidth=width + 1.2, foreground='black')
          ],
      )

  x0, x1, y0, y1 = box
  ax.set_xlim(x0, x1)
  ax.set_ylim(y1, y0)
  ax.set_aspect('equal')
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_facecolor('black')

  # Orientation letters at the edge midpoints.
  bottom = (
      _axis_letters(v_axis)[1]
      if _axis_letters(v_axis)[0] == top
      else _axis_letters(v_axis)[0]
  )
  right = (
      _axis_letters(h_axis)[1]
      if _axis_letters(h_axis)[0] == left
      else _axis_letters(h_axis)[0]
  )
  style = _outlined(color='white', fontsize=10, fontweight='bold')
  ax.text(
      0.5, 0.99, top, transform=ax.transAxes, ha='center', va='top', **style
  )
  ax.text(
      0.5,
      0.01,
      bottom,
      transform=ax.transAxes,
      ha='center',
      va='bottom',
      **style,
  )
  ax.text(
      0.01, 0.5, left, transform=ax.transAxes, ha='left', va='center', **style
  )
  ax.text(
      0.99, 0.5, right, transform=ax.transAxes, ha='right', va='center', **style
  )

  if scale_bar:
    box_w, box_h = x1 - x0, y1 - y0
    length = 50.0 if box_w >= 150 else (20.0 if box_w >= 50 else 10.0)
    bar_x, bar_y = x0 + 0.05 * box_w, y0 + 0.94 * box_h
    ax.plot(
        [bar_x, bar_x + length],
        [bar_y, bar_y],
        color='white',
        linewidth=2.5,
        solid_capstyle='butt',
        path_effects=[patheffects.withStroke(linewidth=4, foreground='black')],
    )
    label = f'{length / 10:g} cm' if length >= 10 else f'{length:g} mm'
    ax.text(
        bar_x + length / 2,
        bar_y - 0.015 * box_h,
        label,
        ha='center',
        va='bottom',
        **_outlined(color='white', fontsize=8),
    )
  return image


def plot_dose_slices(
    ct,
    dose_pred,
    dose_ref,
    structure_masks,
    voxel_dimensions,
    path,
    title: str | None = None,
    *,
    roi_names: Sequence[str] = DEFAULT_ROI_NAMES,
    dpi: int = 110,
) -> Path:
  """Writes `dose_slices_figure(...)` as a PNG (parent folders are created).

  Returns:
    The path written.
  """
  path = Path(path)
  fig = dose_slices_figure(
      ct,
      dose_pred,
      dose_ref,
      structure_masks,
      voxel_dimensions,
      title,
      roi_names=roi_names,
      dpi=dpi,
      where=path,
  )
  return _save(fig, path, dpi)


def dose_slices_figure(
    ct,
    dose_pred,
    dose_ref,
    structure_masks,
    voxel_dimensions,
    title: str | None = None,
    *,
    roi_names: Sequence[str] = DEFAULT_ROI_NAMES,
    dpi: int = 110,
    where='dose slices',
) -> Figure:
  """Axial, coronal and sagittal slices through the PTV centre.

  Rows are the three views, columns prediction, reference and prediction minus
  reference (one column when `dose_ref` is None). Dose is a colourwash over the
  CT (soft-tissue window), transparent below 5% of the maximum dose; the
  difference uses a diverging map symmetric about 0 Gy. ROI contours are drawn
  in fixed per-ROI colours. Pixels have their physical aspect.

  Args:
    ct: (D,H,W) CT as stored by OpenKBP, HU + 1024.
    dose_pred: (D,H,W) predicted dose, Gy.
    dose_ref: (D,H,W) reference dose, Gy, or None.
    structure_masks: bool (D,H,W,R), channels in the order of `roi_names`;
      absent ROIs are all-False channels.
    voxel_dimensions: (3,) mm per array axis.
    title: figure title.
    roi_names: the R channel names (default: the OpenKBP order).
    dpi: resolution.
    where: what error messages name (e.g. the output file).

  Returns:
    The figure (Agg; write it with `savefig`).
  """
  dose_pred = np.asarray(dose_pred, dtype=np.float64)
  if dose_pred.ndim != 3:
    raise ValueError(
        f'{where}: dose_pred must be (D,H,W), got shape {dose_pred.shape}'
    )
  shape = dose_pred.shape
  ct_hu = _check_grid('ct', ct, shape, where).astype(np.float32) - CT_OFFSET
  if dose_ref is not None:
    dose_ref = _check_grid('dose_ref', dose_ref, shape, where).astype(
        np.float64
    )
  masks = _check_masks(structure_masks, shape, roi_names, where)
  voxel_dimensions = np.asarray(voxel_dimensions, dtype=np.float64)
  if voxel_dimensions.shape != (3,) or np.any(voxel_dimensions <= 0):
    raise ValueError(
        f'{where}: voxel_dimensions must be three positive mm values, '
        f'got {voxel_dimensions}'
    )
  present = masks.reshape(-1, masks.shape[-1]).any(axis=0)

  centre = slice_centre(
      masks, dose_ref if dose_ref is not None else dose_pred, roi_names
  )
  vmax = max(
      float(dose_pred.max()),
      float(dose_ref.max()) if dose_ref is not None else 0.0,
  )
  vmax = vmax if vmax > 0 else 1.0
  threshold = DOSE_WASH_THRESHOLD * vmax

  columns = (
      ['Prediction']
      if dose_ref is None
      else ['Prediction', 'Reference', 'Prediction \u2212 reference']
  )
  n_cols = len(columns)
  # Zoom each view onto the body (CT above -400 HU), the dose wash and the ROIs.
  content = (ct_hu > -400) | (dose_pred >= threshold) | masks.any(axis=-1)
  if dose_ref is not None:
    content |= dose_ref >= threshold
  boxes = [
      _view_box(
          v, centre, shape, voxel_dimensions, [_view_slice(content, v, centre)]
      )
      for v in _VIEWS
  ]
  # Row heights follow each view's physical aspect.
  heights = [(b[3] - b[2]) / (b[1] - b[0]) for b in boxes]
  panel_w = 3.8
  fig = Figure(
      figsize=(panel_w * n_cols + 2.4, panel_w * sum(heights) + 1.6),
      layout='constrained',
      dpi=dpi,
  )
  axes = fig.subplots(
      3, n_cols, squeeze=False, gridspec_kw={'height_ratios': heights}
  )

  dose_kwargs = dict(cmap=DOSE_CMAP, vmin=0.0, vmax=vmax, alpha=DOSE_WASH_ALPHA)
  diff_image = None
  if dose_ref is not None:
    diff = dose_pred - dose_ref
    region = (dose_pred >= threshold) | (dose_ref >= threshold)
    shown = [
        np.abs(_view_slice(diff, v, centre))[_view_slice(region, v, centre)]
        for v in _VIEWS
    ]
    shown = np.concatenate(shown) if any(s.size for s in shown) else np.zeros(1)
    # The 99th percentile keeps one outlier voxel from washing out the map.
    diff_max = max(float(np.percentile(shown, 99)), 0.01 * vmax, 1e-3)
    diff_extend = 'both' if shown.max() > diff_max else 'neither'
    diff_kwargs = dict(cmap=DIFF_CMAP, vmin=-diff_max, vmax=diff_max, alpha=0.8)

  for row, view in enumerate(_VIEWS):
    for col, name in enumerate(columns):
      ax = axes[row, col]
      if col < 2:
        volume = dose_pred if col == 0 else dose_ref
        image = _view_slice(volume, view, centre)
        overlay = np.ma.masked_less(image, threshold)
        kwargs = dose_kwargs
      else:
        image = _view_slice(diff, view, centre)
        overlay = np.ma.masked_where(~_view_slice(region, view, centre), image)
        kwargs = diff_kwargs
      im = _draw_panel(
          ax,
          view,
          centre,
          shape,
          voxel_dimensions,
          boxes[row],
          ct_hu,
          overlay,
          kwargs,
          masks,
          roi_names,
          present,
          scale_bar=(col == 0),
      )
      if col < 2:
        dose_image = im
      else:
        diff_image = im
      if row == 0:
        ax.set_title(name, fontsize=12, fontweight='bold')
      if col == 0:
        plane_axis = view[1]
        ax.set_ylabel(
            f'{view[0]}\n(axis {plane_axis} = {centre[plane_axis]})',
            fontsize=11,
        )

  dose_axes = axes[:, : min(n_cols, 2)].ravel().tolist()
  cbar = fig.colorbar(
      dose_image,
      ax=dose_axes,
      location='right',
      shrink=0.6,
      pad=0.01,
      aspect=30,
  )
  cbar.solids.set_alpha(1.0)
  cbar.set_label('Dose (Gy)', fontsize=11)
  if diff_image is not None:
    cbar = fig.colorbar(
        diff_image,
        ax=axes[:, 2].ravel().tolist(),
        location='right',
        shrink=0.6,
        pad=0.01,
        aspect=30,
        extend=diff_extend,
    )
    cbar.solids.set_alpha(1.0)
    cbar.set_label('Prediction \u2212 reference (Gy)', fontsize=11)

  handles = [
      Line2D([], [], color=_roi_colour(name, c), linewidth=2.0, label=name)
      for c, name in enumerate(roi_names)
      if present[c]
  ]
  if handles:
    fig.legend(
        handles=handles,
        loc='outside lower center',
        ncol=min(len(handles), 5 if n_cols > 1 else 3),
        fontsize=10,
        frameon=False,
    )
  fig.suptitle(title or 'Dose distribution', fontsize=13, fontweight='bold')
  return fig


def cumulative_dvh(dose, mask, bins) -> np.ndarray:
  """Percent of the ROI's voxels receiving at least each dose in `bins` (Gy)."""
  values = np.sort(np.asarray(dose)[np.asarray(mask, dtype=bool)])
  if values.size == 0:
    return np.zeros(len(bins))
  return (
      100.0
      * (values.size - np.searchsorted(values, bins, side='left'))
      / values.size
  )


def plot_dvh(
    dose_pred,
    dose_ref,
    structure_masks,
    roi_present,
    path,
    title: str | None = None,
    *,
    roi_names: Sequence[str] = DEFAULT_ROI_NAMES,
    dpi: int = 110,
) -> Path:
  """Writes `dvh_figure(...)` as a PNG (parent folders are created).

  Returns:
    The path written.
  """
  path = Path(path)
  fig = dvh_figure(
      dose_pred,
      dose_ref,
      structure_masks,
      roi_present,
      title,
      roi_names=roi_names,
      dpi=dpi,
      where=path,
  )
  return _save(fig, path, dpi)


def dvh_figure(
    dose_pred,
    dose_ref,
    structure_masks,
    roi_present,
    title: str | None = None,
    *,
    roi_names: Sequence[str] = DEFAULT_ROI_NAMES,
    dpi: int = 110,
    where='DVH',
) -> Figure:
  """Cumulative dose-volume histograms.

  x: dose (Gy); y: percent of the ROI volume receiving at least that dose.
  Reference solid, prediction dashed, one colour per ROI (as in
  `plot_dose_slices`); only ROIs flagged present and non-empty are drawn.

  Args:
    dose_pred: (D,H,W) predicted dose, Gy.
    dose_ref: (D,H,W) reference dose, Gy, or None (prediction only, solid).
    structure_masks: bool (D,H,W,R) in the order of `roi_names`.
    roi_present: bool (R,).
    title: axes title.
    roi_names: the R channel names (default: the OpenKBP order).
    dpi: resolution.
    where: what error messages name (e.g. the output file).

  Returns:
    The figure (Agg; write it with `savefig`).
  """
  dose_pred = np.asarray(dose_pred, dtype=np.float64)
  if dose_pred.ndim != 3:
    raise ValueError(
        f'{where}: dose_pred must be (D,H,W), got shape {dose_pred.shape}'
    )
  shape = dose_pred.shape
  if dose_ref is not None:
    dose_ref = _check_grid('dose_ref', dose_ref, shape, where).astype(
        np.float64
    )
  masks = _check_masks(structure_masks, shape, roi_names, where)
  roi_present = np.asarray(roi_present, dtype=bool)
  if roi_present.shape != (len(roi_names),):
    raise ValueError(
        f'{where}: roi_present has shape {roi_present.shape}, '
        f'expected ({len(roi_names)},)'
    )

  vmax = max(
      float(dose_pred.max()),
      float(dose_ref.max()) if dose_ref is not None else 0.0,
  )
  bins = np.linspace(0.0, max(vmax, 1e-6) * 1.02, 600)
  fig = Figure(figsize=(9.5, 6.0), layout='constrained', dpi=dpi)
  ax = fig.subplots()
  roi_handles = []
  for channel, name in enumerate(roi_names):
    mask = masks[..., channel]
    if not roi_present[channel] or not mask.any():
      continue
    colour = _roi_colour(name, channel)
    width = 2.0 if _is_target(name) else 1.6
    if dose_ref is not None:
      ax.plot(
          bins,
          cumulative_dvh(dose_ref, mask, bins),
          color=colour,
          linewidth=width,
      )
      ax.plot(
          bins,
          cumulative_dvh(dose_pred, mask, bins),
          color=colour,
          linewidth=width,
          linestyle=(0, (5, 2.5)),
      )
    else:
      ax.plot(
          bins,
          cumulative_dvh(dose_pred, mask, bins),
          color=colour,
          linewidth=width,
      )
    roi_handles.append(Line2D([], [], color=colour, linewidth=2.5, label=name))

  ax.set_xlim(0, bins[-1])
  ax.set_ylim(0, 102)
  ax.set_xlabel('Dose (Gy)', fontsize=12)
  ax.set_ylabel('Volume (%)', fontsize=12)
  ax.grid(True, color='0.85', linewidth=0.8)
  ax.minorticks_on()
  ax.grid(True, which='minor', color='0.94', linewidth=0.5)
  ax.set_axisbelow(True)
  ax.set_title(
      title or 'Cumulative dose-volume histogram',
      fontsize=13,
      fontweight='bold',
  )

  if dose_ref is not None:
    style_handles = [
        Line2D([], [], color='black', linewidth=1.8, label='Reference'),
        Line2D(
            [],
            [],
            color='black',
            linewidth=1.8,
            linestyle=(0, (5, 2.5)),
            label='Prediction',
        ),
    ]
  else:
    style_handles = [
        Line2D([], [], color='black', linewidth=1.8, label='Prediction')
    ]
  ax.legend(
      handles=roi_handles + style_handles,
      loc='upper left',
      bbox_to_anchor=(1.01, 1.0),
      fontsize=10,
      frameon=False,
  )
  return fig


def view_planes(shape, centre) -> np.ndarray:
  """bool (D,H,W): the voxels of the three planes the slice views show.

  The axial, coronal and sagittal planes through `centre` (a voxel index);
  e.g. to compute a gamma map only where `gamma_slices_figure` draws it.
  """
  planes = np.zeros(shape, dtype=bool)
  for _, plane_axis, _, _ in _VIEWS:
    index = [slice(None)] * len(shape)
    index[plane_axis] = centre[plane_axis]
    planes[tuple(index)] = True
  return planes


def gamma_slices_figure(
    ct,
    gamma,
    structure_masks,
    voxel_dimensions,
    centre,
    title: str | None = None,
    *,
    criterion: str = '3%/3mm',
    roi_names: Sequence[str] = DEFAULT_ROI_NAMES,
    dpi: int = 110,
    where='gamma map',
) -> Figure:
  """Gamma index maps on the axial, coronal and sagittal planes through `centre`.

  One row of the three views (the views, zoom and contours of
  `dose_slices_figure`) over the CT: gamma from 0 (blue) through 1 (white) to
  `GAMMA_MAX` and above (red); voxels without a gamma value (NaN: outside the
  evaluated points) are transparent. Each panel's title gives the pass rate
  (gamma < 1) of the points shown in it.

  Args:
    ct: (D,H,W) CT as stored by OpenKBP, HU + 1024.
    gamma: (D,H,W) gamma values, NaN where not evaluated (at least the planes
      through `centre`, see `view_planes`).
    structure_masks: bool (D,H,W,R) in the order of `roi_names`.
    voxel_dimensions: (3,) mm per array axis.
    centre: the voxel (axis 0, 1, 2) the planes pass through, e.g.
      `slice_centre(structure_masks, reference_dose)` as the dose slices use.
    title: figure title.
    criterion: the gamma criterion, for the colour bar label.
    roi_names: the R channel names (default: the OpenKBP order).
    dpi: resolution.
    where: what error messages name.

  Returns:
    The figure (Agg; write it with `savefig`).
  """
  gamma = np.asarray(gamma, dtype=np.float64)
  if gamma.ndim != 3:
    raise ValueError(f'{where}: gamma must be (D,H,W), got shape {gamma.shape}')
  shape = gamma.shape
  ct_hu = _check_grid('ct', ct, shape, where).astype(np.float32) - CT_OFFSET
  masks = _check_masks(structure_masks, shape, roi_names, where)
  voxel_dimensions = np.asarray(voxel_dimensions, dtype=np.float64)
  if voxel_dimensions.shape != (3,) or np.any(voxel_dimensions <= 0):
    raise ValueError(
        f'{where}: voxel_dimensions must be three positive mm values, '
        f'got {voxel_dimensions}'
    )
  centre = tuple(int(c) for c in centre)
  if len(centre) != 3 or not all(0 <= c < n for c, n in zip(centre, shape)):
    raise ValueError(f'{where}: centre {centre} is outside the grid {shape}')
  present = masks.reshape(-1, masks.shape[-1]).any(axis=0)
  evaluated = np.isfinite(gamma)
  content = (ct_hu > -400) | masks.any(axis=-1) | evaluated
  boxes = [
      _view_box(
          v, centre, shape, voxel_dimensions, [_view_slice(content, v, centre)]
      )
      for v in _VIEWS
  ]
  widths = [(b[1] - b[0]) / (b[3] - b[2]) for b in boxes]
  panel_h = 3.8
  fig = Figure(
      figsize=(panel_h * sum(widths) + 1.6, panel_h + 1.9),
      layout='constrained',
      dpi=dpi,
  )
  axes = fig.subplots(
      1, 3, squeeze=False, gridspec_kw={'width_ratios': widths}
  )[0]
  kwargs = dict(cmap=GAMMA_CMAP, vmin=0.0, vmax=GAMMA_MAX, alpha=0.85)
  image = None
  for ax, view, box in zip(axes, _VIEWS, boxes):
    values = _view_slice(gamma, view, centre)
    shown = values[np.isfinite(values)]
    image = _draw_panel(
        ax,
        view,
        centre,
        shape,
        voxel_dimensions,
        box,
        ct_hu,
        np.ma.masked_invalid(values),
        kwargs,
        masks,
        roi_names,
        present,
        scale_bar=True,
    )
    rate = (
        f'{100.0 * np.count_nonzero(shown < 1) / shown.size:.1f}% of '
        f'{shown.size} pass'
        if shown.size
        else 'no points evaluated'
    )
    ax.set_title(f'{view[0]}: {rate}', fontsize=11)
  cbar = fig.colorbar(
      image,
      ax=axes.tolist(),
      location='right',
      shrink=0.8,
      pad=0.01,
      aspect=25,
      extend='max',
  )
  cbar.solids.set_alpha(1.0)
  cbar.set_label(f'Gamma ({criterion})', fontsize=11)
  handles = [
      Line2D([], [], color=_roi_colour(name, c), linewidth=2.0, label=name)
      for c, name in enumerate(roi_names)
      if present[c]
  ]
  if handles:
    fig.legend(
        handles=handles,
        loc='outside lower center',
        ncol=min(len(handles), 5),
        fontsize=10,
        frameon=False,
    )
  fig.suptitle(title or f'Gamma {criterion}', fontsize=13, fontweight='bold')
  return fig


def write_patient_plots(
    patient,
    dose_pred,
    out_dir,
    *,
    roi_names: Sequence[str] | None = None,
    dpi: int = 110,
) -> list[Path]:
  """Writes `<patient_id>_slices.png` and `<patient_id>_dvh.png` into `out_dir`.

  Args:
    patient: a `data.openkbp.Patient` (uses patient_id, ct, dose (reference,
      may be None), structure_masks, roi_present, voxel_dimensions).
    dose_pred: (D,H,W) predicted dose, Gy.
    out_dir: output folder (created if missing).
    roi_names: channel names; default the OpenKBP order.
    dpi: resolution of both PNGs.

  Returns:
    [slices path, DVH path].
  """
  names = tuple(roi_names) if roi_names is not None else DEFAULT_ROI_NAMES
  out_dir = Path(out_dir)
  pid = patient.patient_id
  slices = plot_dose_slices(
      patient.ct,
      dose_pred,
      patient.dose,
      patient.structure_masks,
      patient.voxel_dimensions,
      out_dir / f'{pid}_slices.png',
      title=f'{pid}: predicted dose',
      roi_names=names,
      dpi=dpi,
  )
  dvh = plot_dvh(
      dose_pred,
      patient.dose,
      patient.structure_masks,
      patient.roi_present,
      out_dir / f'{pid}_dvh.png',
      title=f'{pid}: dose-volume histogram',
      roi_names=names,
      dpi=dpi,
  )
  return [slices, dvh]


def plot_patient(
    patient,
    path=None,
    title: str | None = None,
    *,
    roi_names: Sequence[str] | None = None,
    dpi: int = 110,
) -> Figure:
  """The model's inputs for one patient: CT with PTV and OAR contours, no dose.

  One row of axial, coronal and sagittal slices through the PTV centre (the
  same views, colours and conventions as `plot_dose_slices`), zoomed onto the
  body; contoured ROIs are listed in the legend.

  Args:
    patient: a `data.openkbp.Patient` (uses patient_id, ct (HU + 1024),
      structure_masks, voxel_dimensions; dose, if any, only to centre the
      views when no target is contoured).
    path: output PNG (parent folders are created), or None to only return
      the figure.
    title: figure title; default the patient id.
    roi_names: channel names; default the OpenKBP order.
    dpi: resolution.

  Returns:
    The figure (Agg; write it with `savefig` or show it in a notebook).
  """
  names = tuple(roi_names) if roi_names is not None else DEFAULT_ROI_NAMES
  where = path if path is not None else patient.patient_id
  ct = np.asarray(patient.ct)
  if ct.ndim != 3:
    raise ValueError(f'{where}: ct must be (D,H,W), got shape {ct.shape}')
  shape = ct.shape
  ct_hu = ct.astype(np.float32) - CT_OFFSET
  masks = _check_masks(patient.structure_masks, shape, names, where)
  voxel_dimensions = np.asarray(patient.voxel_dimensions, dtype=np.float64)
  if voxel_dimensions.shape != (3,) or np.any(voxel_dimensions <= 0):
    raise ValueError(
        f'{where}: voxel_dimensions must be three positive mm values, '
        f'got {voxel_dimensions}'
    )
  present = masks.reshape(-1, masks.shape[-1]).any(axis=0)
  content = (ct_hu > -400) | masks.any(axis=-1)
  dose = getattr(patient, 'dose', None)
  targets = [c for c, name in enumerate(names) if _is_target(name)]
  if dose is None and not masks[..., targets].any():
    # Nothing to centre on: the centre of the body (or of the grid).
    points = (
        np.argwhere(content)
        if content.any()
        else np.argwhere(np.ones(shape, bool))
    )
    centre = tuple(int(round(c)) for c in points.mean(axis=0))
  else:
    centre = slice_centre(masks, dose, names)
  boxes = [
      _view_box(
          v, centre, shape, voxel_dimensions, [_view_slice(content, v, centre)]
      )
      for v in _VIEWS
  ]
  # Column widths follow each view's physical aspect, so pixels stay square.
  widths = [(b[1] - b[0]) / (b[3] - b[2]) for b in boxes]
  panel_h = 3.8
  fig = Figure(
      figsize=(panel_h * sum(widths) + 0.8, panel_h + 1.6),
      layout='constrained',
      dpi=dpi,
  )
  axes = fig.subplots(
      1, 3, squeeze=False, gridspec_kw={'width_ratios': widths}
  )[0]
  nothing = np.ma.masked_all((1, 1))  # no dose wash: CT and contours only
  for ax, view, box in zip(axes, _VIEWS, boxes):
    _draw_panel(
        ax,
        view,
        centre,
        shape,
        voxel_dimensions,
        box,
        ct_hu,
        nothing,
        {},
        masks,
        names,
        present,
        scale_bar=True,
    )
    plane_axis = view[1]
    ax.set_title(
        f'{view[0]} (axis {plane_axis} = {centre[plane_axis]})', fontsize=11
    )

  handles = [
      Line2D([], [], color=_roi_colour(name, c), linewidth=2.0, label=name)
      for c, name in enumerate(names)
      if present[c]
  ]
  if handles:
    fig.legend(
        handles=handles,
        loc='outside lower center',
        ncol=min(len(handles), 5),
        fontsize=10,
        frameon=False,
    )
  fig.suptitle(
      title or f'{patient.patient_id}: CT with PTV and OAR contours',
      fontsize=13,
      fontweight='bold',
  )
  if path is not None:
    _save(fig, Path(path), dpi)
  return fig
