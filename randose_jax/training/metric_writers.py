"""Metrics to TensorBoard and to JSON lines, from process 0 only.

`<workdir>/metrics.jsonl` holds one JSON object per write (`step` plus the
scalars); `<workdir>/tensorboard/` holds the same scalars as event files
(tensorboardX, no TensorFlow needed).

A resumed run (`resume_step=N`) first drops what the interrupted run wrote
after its checkpoint at step N, which it is about to write again: the
records of `metrics.jsonl` with a step above N, those holding only `final/`
scores (written again when the run ends) and a last line cut short by a
kill. The file is rewritten atomically, the kept lines byte for byte.
TensorBoard hides the events above N itself (`purge_step`).
"""

import json
import logging
import math
import pathlib
from typing import Optional

from randose_jax import fileio

FILE_NAME = "metrics.jsonl"


def _kept(line: bytes, resume_step: int) -> bool:
  """Whether a complete line of metrics.jsonl survives a resume at
  `resume_step` (lines that do not parse are kept as they are)."""
  try:
    record = json.loads(line)
    step = int(record["step"])
  except (ValueError, KeyError, TypeError):
    return True
  if step > resume_step:
    return False
  scalars = [k for k in record if k != "step"]
  return not (scalars and all(k.startswith("final/") for k in scalars))


def truncate_for_resume(path, resume_step: int) -> int:
  """Drops the records a run resumed at `resume_step` writes again (see the
  module docstring); returns how many lines were dropped. Atomic: a kill
  leaves either the old or the new file."""
  path = pathlib.Path(path)
  if not path.is_file():
    return 0
  data = path.read_bytes()
  lines = data.split(b"\n")
  complete, torn = lines[:-1], lines[-1]  # torn: b"" when data ends in \n
  kept = [l for l in complete if _kept(l, resume_step)]
  dropped = len(complete) - len(kept) + (1 if torn else 0)
  if not dropped:
    return 0
  with fileio.atomic_output(path, overwrite=True) as f:
    f.write(b"".join(l + b"\n" for l in kept))
  return dropped


class MetricWriter:
  """Writes scalars to TensorBoard and `metrics.jsonl`; a no-op if disabled."""

  def __init__(
      self, workdir, enabled: bool = True, resume_step: Optional[int] = None
  ):
    """`resume_step`: the step the run starts from (0 for a fresh run);
    what an earlier run logged after it is dropped (module docstring).
    None keeps everything."""
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    if resume_step is not None:
      dropped = truncate_for_resume(workdir / FILE_NAME, resume_step)
      if dropped:
        logging.info(
            "%s: dropped %d record(s) logged after step %d, which "
            "this run logs again",
            workdir / FILE_NAME,
            dropped,
            resume_step,
        )
    self._jsonl = open(workdir / FILE_NAME, "a", encoding="utf-8")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      purge = {} if resume_step is None else {"purge_step": resume_step + 1}
      self._tb = SummaryWriter(str(workdir / "tensorboard"), **purge)
    except ImportError:
      logging.warning(
          "tensorboardX is not installed: TensorBoard summaries "
          "are off (metrics.jsonl is still written)."
      )

  def write_scalars(self, step: int, scalars: dict):
    if not self.enabled or self._jsonl is None:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    record = {"step": int(step)}
    record.update(
        {k: v if math.isfinite(v) else str(v) for k, v in clean.items()}
    )
    try:
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
    except OSError as e:  # a full disk: name the file
      f, self._jsonl = self._jsonl, None
      try:
        f.close()
      except OSError:
        pass  # the same error again (the buffered line)
      raise OSError(e.errno, e.strerror or str(e), f.name) from e
    if self._tb is not None:
      try:
        for k, v in clean.items():
          self._tb.add_scalar(k, v, int(step))
        self._tb.flush()
      except OSError as e:  # a full disk: name the folder
        raise OSError(
            e.errno, e.strerror or str(e), e.filename or self._tb.logdir
        ) from e

  def write_hparams(self, config_dict: dict):
    if self.enabled and self._tb is not None:
      self._tb.add_text(
          "config", "```\n" + json.dumps(config_dict, indent=2) + "\n```", 0
      )

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
