"""Metrics to TensorBoard and to JSON lines, from process 0 only.

`<workdir>/metrics.jsonl` holds one JSON object per write (`step` plus the
scalars); `<workdir>/tensorboard/` holds the same scalars as event files
(tensorboardX, no TensorFlow needed).
"""

import json
import logging
import math
import pathlib


class MetricWriter:
  """Writes scalars to TensorBoard and `metrics.jsonl`; a no-op if disabled."""

  def __init__(self, workdir, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(workdir / "tensorboard"))
    except ImportError:
      logging.warning("tensorboardX is not installed: TensorBoard summaries "
                      "are off (metrics.jsonl is still written).")

  def write_scalars(self, step: int, scalars: dict):
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    record = {"step": int(step)}
    record.update({k: (v if math.isfinite(v) else str(v))
                   for k, v in clean.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def write_hparams(self, config_dict: dict):
    if self.enabled and self._tb is not None:
      self._tb.add_text("config", "```\n" + json.dumps(config_dict, indent=2)
                        + "\n```", 0)

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
