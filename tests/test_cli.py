"""First contact with the command-line tools (issue 11): --help, usage
lines, config typos, a NaN stop, and what a run tells the user about
itself. The faults of the data and files are in test_fault_table.py."""

import re
import subprocess
import sys

from flax import linen as nn
import jax
import pytest

from randose_jax.training import train
from randose_jax.training import validation
from tests.test_fault_table import DEMO, run_in_process
from tests.test_train import REPO, SUBPROCESS_ENV, tiny_config
from tests import helpers

CLIS = ("main", "predict", "evaluate", "export", "summary", "dicom_import")


def test_help_exits_0_with_clean_usage_lines():
  for tool in CLIS:
    done = subprocess.run(
        [sys.executable, "-m", helpers.command_module(tool), "--help"],
        cwd=REPO,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (tool, done.stderr[-2000:])
    assert "python -m randose_jax." in done.stdout, tool
    usage = done.stdout.split("flags:")[0]
    # A backslash-continued usage line keeps its line breaks: no run of
    # spaces inside a line (only the indentation at its start).
    for line in usage.splitlines():
      assert not re.search(r"\S {3,}-", line), (tool, line)
    assert done.stderr == "", (tool, done.stderr)


def test_the_console_commands_and_the_documented_modules_exist():
  """pyproject's [project.scripts] each name a `run` that runs a command's
  `main`; `python -m randose_jax.main` (the design card's entry point) and
  `python -m randose_jax.predict` (the shipped model's command) still run."""
  import importlib  # pylint: disable=g-import-not-at-top

  tomllib = pytest.importorskip("tomllib")  # Python 3.11+

  scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
      "scripts"
  ]
  assert {"randose-train", "randose-predict", "randose-evaluate"} <= set(
      scripts
  )
  for name, target in scripts.items():
    module_name, function = target.split(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, function)), name
    assert callable(module.main) and callable(module.define_flags), name
  for shim, command in (("main", "train"), ("predict", "predict")):
    module = importlib.import_module(f"randose_jax.{shim}")
    assert (
        module.run is importlib.import_module(f"randose_jax.cli.{command}").run
    )
    done = subprocess.run(
        [sys.executable, "-m", f"randose_jax.{shim}", "--help"],
        cwd=REPO,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "--workdir" in done.stdout, shim
    # The usage is the command's own docstring.
    assert f"python -m randose_jax.{shim} " in done.stdout, shim


def _main(args, capfd):
  return run_in_process("main", args, capfd)


@pytest.mark.parametrize(
    "args,want",
    [
        (
            ["--config.data.rooot=/data"],
            "error: --config.data.rooot: the config has no field 'data.rooot'; "
            'did you mean "root" instead of "rooot"?',
        ),
        (
            ["--config.num_train_steps=many"],
            "error: flag --config.num_train_steps=many: invalid literal for int()",
        ),
    ],
)
def test_config_override_typo_is_one_unescaped_line(
    args, want, tmp_path, capfd
):
  code, out, err = _main(
      [f"--config={DEMO}", f"--workdir={tmp_path / 'w'}", *args], capfd
  )
  assert code == 2
  assert err.splitlines() == [err.strip()] and err.startswith(want), err
  assert "\\" not in err
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "config,want",
    [
        (
            "configs/demoo.py",
            "error: --config=configs/demoo.py: no such config file",
        ),
        (f"{REPO}/configs/openkbp.py:smok", "unknown variant 'smok'"),
    ],
)
def test_bad_config_file_is_one_line(
    config, want, tmp_path, capfd, monkeypatch
):
  monkeypatch.chdir(tmp_path)
  code, _, err = _main(
      [f"--config={config}", f"--workdir={tmp_path / 'w'}"], capfd
  )
  assert code == 2
  assert len(err.splitlines()) == 1 and want in err, err
  assert "Traceback" not in err


def test_a_broken_config_file_names_its_line(tmp_path, capfd):
  path = tmp_path / "mine.py"
  path.write_text("def get_config():\n  return (\n")
  code, _, err = _main(
      [f"--config={path}", f"--workdir={tmp_path / 'w'}"], capfd
  )
  assert code == 2
  assert len(err.splitlines()) == 1, err
  assert f"{path}: line 2" in err


def test_usage_errors_and_unknown_flags_are_one_line(tmp_path, capfd):
  code, _, err = _main([f"--config={DEMO}"], capfd)  # no --workdir
  assert code == 2 and len(err.splitlines()) == 1 and "--workdir" in err
  code, _, err = _main([f"--config={DEMO}", "--workdir=w", "--bogus"], capfd)
  assert code == 2 and err == "error: Unknown command line flag 'bogus'\n"


def test_nan_stop_is_one_line(tmp_path, capfd):
  code, _, err = _main(
      [
          f"--config={DEMO}:smoke",
          f"--workdir={tmp_path / 'w'}",
          "--config.learning_rate=1e38",
          "--config.num_train_steps=8",
          "--config.eval_every_steps=100",
      ],
      capfd,
  )
  assert code == 2, err
  assert len(err.splitlines()) == 1, err
  assert err.startswith("error: Training stopped: the loss became NaN")
  assert "no checkpoint was saved" in err


def test_an_unexpected_exception_keeps_its_traceback(capfd):
  from absl import flags  # pylint: disable=g-import-not-at-top

  def main(argv):
    del argv
    raise ZeroDivisionError("a bug")

  with pytest.raises(ZeroDivisionError):
    helpers.invoke(main, ["x"], flags.FlagValues())


# --------------------------------------- what a run says about itself


class _Shifted(nn.Module):
  """The real loss minus 100: a negative loss, whatever the data."""

  inner: nn.Module

  def __call__(self, *args):
    loss, metrics = self.inner(*args)
    return loss - 100.0, metrics


def test_run_announces_its_validations_and_explains_itself(
    tmp_path, capsys, monkeypatch
):
  real = train.losses.create_loss
  monkeypatch.setattr(train.losses, "create_loss", lambda c: _Shifted(real(c)))
  config = tiny_config(max_eval_patients=1)
  summary = train.train_and_evaluate(
      config, tmp_path, mesh=train.make_mesh(jax.devices()[:1])
  )
  out = capsys.readouterr().out
  # The periodic validations score 1 patient, the final one both: said.
  assert (
      "every 2 steps and at the end a validation scores the first 1 of "
      "the 2 validation patients (config.max_eval_patients); then the "
      "best checkpoint is scored on all 2"
  ) in out
  assert "step 2: validation dose score" in out and "(1 patients)" in out
  assert "Validation (2 patients" in out
  # A negative loss is explained once, where it is printed.
  assert out.count("note: the loss is negative from step 2") == 1
  assert "log-variance" in out
  # Not beating the baseline after 4 steps is said to be expected.
  beaten = (
      summary["dose_score"] < summary["baseline_mean_dose_score"]
      and summary["dvh_score"] < summary["baseline_mean_dvh_score"]
  )
  assert ("does not beat the mean-dose baseline" in out) != beaten
  if not beaten:
    assert "4 training steps are far too few" in out


def test_short_run_note_says_so_only_for_short_runs():
  assert "far too few" in validation.short_run_note(tiny_config())
  assert "far too few" not in validation.short_run_note(
      tiny_config(num_train_steps=5000)
  )


@pytest.mark.parametrize(
    "dose,dvh,says",
    [
        (3.0, 4.0, None),
        (12.0, 4.0, "on the dose score:"),
        # The case: a better dose score, a worse DVH score.
        (3.0, 31.0, "on the DVH score:"),
        (12.0, 31.0, "on the dose score and the DVH score:"),
    ],
)
def test_baseline_note_for_a_worse_dose_or_dvh_score(dose, dvh, says):
  """A run that does not beat the mean-dose baseline on either score gets
  the note, naming the score(s); one that beats both gets none."""
  summary = {
      "dose_score": dose,
      "dvh_score": dvh,
      "baseline_mean_dose_score": 10.0,
      "baseline_mean_dvh_score": 30.0,
  }
  note = validation.baseline_note(summary, tiny_config())
  if says is None:
    assert note is None
  else:
    assert note.startswith("note: the model does not beat the mean-dose")
    assert says in note and "4 training steps are far too few" in note
