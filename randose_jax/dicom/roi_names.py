"""Clinic structure names -> OpenKBP ROIs: the default synonym table and the
user's map file.

A name is split into lower-case tokens (at case changes, letter/digit changes
and anything not a letter or digit: "SpinalCord_PRV" -> spinal cord prv,
"PTV 70Gy" -> ptv 70 gy, "Lt Parotid" -> lt parotid). Then, first match wins:

  1. the user map (`--roi_map`): an exact name (case-insensitive), then the
     `re:` keys (Python regular expressions, full match, case-insensitive) in
     file order; a value is an OpenKBP ROI name, "Body" (the possible-dose
     mask) or null (ignore the structure);
  2. `--ptv_doses` (NAME=Gy): that structure is a PTV at that level;
  3. the default table below. An OAR or body name must consist of the
     synonym's tokens (plus a side for the parotids, and the filler words
     gland / total); any other token (prv, opt, ring, 5mm, a number...) means
     a derived structure, which is not mapped: "SpinalCord_PRV" is not
     SpinalCord. A PTV is a name whose first token begins with "ptv" and has
     none of the derived-structure tokens; its level is the first number of
     the name (Gy; cGy when "cgy" follows it or when it is 200 or more).

A PTV level goes to the nearest OpenKBP target channel (PTV56, PTV63, PTV70)
within `PTV_LEVEL_TOLERANCE_GY`; other levels are not mapped (a warning).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from randose_jax.conventions import ROI_NAMES
from randose_jax.dicom import DicomError

BODY = "Body"
# OpenKBP target channels and their prescriptions (Gy).
PTV_LEVELS = {"PTV56": 56.0, "PTV63": 63.0, "PTV70": 70.0}
PTV_LEVEL_TOLERANCE_GY = 3.5

# Default synonyms: target -> token sequences (after side and filler tokens
# are removed). One place; the user map extends it.
SYNONYMS = {
    "Brainstem": (("brainstem",), ("brain", "stem")),
    "SpinalCord": (("spinal", "cord"), ("spinalcord",), ("cord",)),
    "Parotid": (("parotid",),),  # needs a side: RightParotid / LeftParotid
    "Esophagus": (("esophagus",), ("oesophagus",), ("esoph",), ("oesoph",)),
    "Larynx": (("larynx",),),
    "Mandible": (("mandible",), ("bone", "mandible")),
    BODY: (("external",), ("body",), ("skin",), ("outline",)),
}
LEFT = frozenset({"l", "lt", "left", "lft", "sin"})
RIGHT = frozenset({"r", "rt", "right", "rgt", "dx"})
FILLER = frozenset({"gland", "total"})
# Tokens of derived structures (planning risk volumes, optimisation helpers,
# rings, margins): such a structure is never mapped by the default table.
DERIVED = frozenset(
    {
        "prv",
        "opt",
        "optim",
        "avoid",
        "avd",
        "ring",
        "planning",
        "plan",
        "exp",
        "expand",
        "expanded",
        "plus",
        "minus",
        "mm",
        "cm",
        "dummy",
        "z",
        "zz",
        "help",
        "helper",
        "aux",
        "ctv",
        "gtv",
        "itv",
        "dose",
        "hot",
        "cold",
        "old",
        "wire",
        "block",
        "isodose",
        "ptv",
        "crop",
        "margin",
        "shell",
    }
)


def tokens(name: str) -> list[str]:
  """Lower-case tokens of a structure name (see the module docstring)."""
  text = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
  text = re.sub(
      r"([A-Za-z])([0-9])|([0-9])([A-Za-z])",
      lambda m: " ".join(g for g in m.groups() if g),
      text,
  )
  return re.findall(r"[a-z]+|[0-9]+(?:\.[0-9]+)?", text.lower())


@dataclasses.dataclass(frozen=True)
class Match:
  """Where one structure goes.

  Attributes:
    target: an OpenKBP ROI name, `BODY`, or None (not used).
    dose_gy: the PTV level (Gy) for a PTV, else None.
    rule: what decided it ("roi map", "ptv_doses", "default", "none").
    warning: set when the structure looks relevant but is not used.
  """

  target: str | None
  dose_gy: float | None = None
  rule: str = "none"
  warning: str | None = None


def ptv_channel(dose_gy: float) -> str | None:
  """The OpenKBP target channel for a PTV level, None if none is near."""
  name = min(PTV_LEVELS, key=lambda n: abs(PTV_LEVELS[n] - dose_gy))
  return (
      name
      if abs(PTV_LEVELS[name] - dose_gy) <= PTV_LEVEL_TOLERANCE_GY
      else None
  )


def _ptv_match(name: str, dose_gy: float | None, rule: str) -> Match:
  if dose_gy is None:
    return Match(
        None,
        None,
        rule,
        f"PTV {name!r} has no dose level in its "
        "name; give one with --ptv_doses",
    )
  channel = ptv_channel(dose_gy)
  if channel is None:
    return Match(
        None,
        dose_gy,
        rule,
        f"PTV {name!r} at {dose_gy:g} Gy is not "
        f"within {PTV_LEVEL_TOLERANCE_GY} Gy of 56, 63 or 70 Gy: not used",
    )
  return Match(channel, dose_gy, rule)


def _ptv_level(toks: list[str]) -> float | None:
  for i, tok in enumerate(toks):
    if tok[0].isdigit():
      value = float(tok)
      unit = "".join(toks[i + 1 : i + 3]) if i + 1 < len(toks) else ""
      if unit.startswith("cgy") or (not unit.startswith("gy") and value >= 200):
        value /= 100
      return value
  return None


def default_match(name: str, interpreted_type: str = "") -> Match:
  """The default table's answer for one name (and its RTROIInterpretedType)."""
  toks = tokens(name)
  if not toks:
    return Match(None)
  if toks[0].startswith("ptv"):
    rest = toks[1:] if toks[0] == "ptv" else [toks[0][3:]] + toks[1:]
    if any(t in DERIVED for t in rest):
      return Match(None)
    return _ptv_match(name, _ptv_level(rest), "default")
  if any(t in DERIVED or t[0].isdigit() for t in toks):
    return Match(None)
  sides = {("L" if t in LEFT else "R") for t in toks if t in LEFT | RIGHT}
  core = tuple(t for t in toks if t not in LEFT | RIGHT | FILLER)
  for target, synonyms in SYNONYMS.items():
    if core in synonyms:
      if target == "Parotid":
        if len(sides) != 1:
          return Match(
              None,
              None,
              "default",
              f"{name!r}: a parotid without one side (L or R) is not used",
          )
        return Match(
            "LeftParotid" if sides == {"L"} else "RightParotid", None, "default"
        )
      if sides:
        return Match(None)
      return Match(target, None, "default")
  if str(interpreted_type).upper() == "EXTERNAL" and not sides:
    return Match(BODY, None, "default")
  return Match(None)


def _check_target(target, where: str):
  if target is None or target in ROI_NAMES or target == BODY:
    return target
  raise DicomError(
      f"{where}: unknown target {target!r}; use one of "
      f"{', '.join(ROI_NAMES)}, {BODY} or null"
  )


def load_roi_map(path) -> dict:
  """Reads a user ROI map: a JSON (or, with pyyaml, YAML) object of
  name or `re:regex` -> OpenKBP ROI name, "Body" or null.

  Raises:
    DicomError: unreadable file, not an object, a bad target or regex.
  """
  path = Path(path)
  try:
    text = path.read_text()
  except OSError as e:
    raise DicomError(
        f"{path}: cannot read the ROI map ({e.strerror or e})"
    ) from e
  if path.suffix.lower() in (".yaml", ".yml"):
    try:
      import yaml  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise DicomError(
          f"{path}: a YAML ROI map needs pyyaml (pip install "
          "pyyaml), or write it as JSON"
      ) from e
    try:
      data = yaml.safe_load(text)
    except yaml.YAMLError as e:
      raise DicomError(
          f"{path}: not valid YAML ({str(e).splitlines()[0]})"
      ) from e
  else:
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise DicomError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(data, dict):
    raise DicomError(
        f"{path}: expected an object of name -> ROI, got "
        f"{type(data).__name__}"
    )
  out = {}
  for key, target in data.items():
    key = str(key)
    _check_target(target, f"{path}: {key!r}")
    if key.startswith("re:"):
      try:
        re.compile(key[3:])
      except re.error as e:
        raise DicomError(
            f"{path}: {key!r} is not a valid regular expression ({e})"
        ) from e
    out[key] = target
  return out


def parse_ptv_doses(items) -> dict[str, float]:
  """`["PTV_high=70", "PTV_low=56"]` -> {"ptv_high": 70.0, ...} (names lower-case).

  Raises:
    DicomError: an item without `=` or a level that is not a positive number.
  """
  out = {}
  for item in items or ():
    name, sep, value = str(item).rpartition("=")
    try:
      level = float(value)
    except ValueError:
      level = -1.0
    if not sep or not name.strip() or not level > 0:
      raise DicomError(
          f"--ptv_doses: {item!r} is not NAME=Gy (a positive level)"
      )
    out[name.strip().lower()] = level
  return out


class RoiMapper:
  """Maps structure names with the user map, `--ptv_doses` and the defaults."""

  def __init__(
      self,
      user_map: dict | None = None,
      ptv_doses: dict[str, float] | None = None,
  ):
    user_map = user_map or {}
    self._exact = {
        k.strip().lower(): v
        for k, v in user_map.items()
        if not k.startswith("re:")
    }
    self._regex = [
        (re.compile(k[3:], re.IGNORECASE), v)
        for k, v in user_map.items()
        if k.startswith("re:")
    ]
    self._ptv_doses = {k.lower(): v for k, v in (ptv_doses or {}).items()}

  def _user(self, name: str, target) -> Match:
    if target in PTV_LEVELS:
      return Match(target, PTV_LEVELS[target], "roi map")
    return Match(target, None, "roi map")

  def match(self, name: str, interpreted_type: str = "") -> Match:
    key = name.strip().lower()
    if key in self._exact:
      return self._user(name, self._exact[key])
    for regex, target in self._regex:
      if regex.fullmatch(name.strip()):
        return self._user(name, target)
    if key in self._ptv_doses:
      return _ptv_match(name, self._ptv_doses[key], "ptv_doses")
    return default_match(name, interpreted_type)
