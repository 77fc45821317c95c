"""The commands: flags, messages and one call into the library each.

  train.py         train and evaluate (`python -m randose_jax.main`)
  predict.py       doses for patient folders (`python -m randose_jax.predict`)
  evaluate.py      scores, clinical metrics and the report of predictions
  export.py        a model as a standalone jax.export artifact
  summary.py       parameters, FLOPs and the convolution plan of a config
  dicom_import.py  DICOM plans -> OpenKBP patient folders
  transport.py     the transport archive: pack, unpack into a cache, check
  common.py        what every command shares: flag parsing, `error:` lines,
                   signals

Each is also a console command (`randose-train`, `randose-predict`, ...;
pyproject.toml) and runs as `python -m randose_jax.cli.<name>`.
"""
