"""`python -m randose_jax.predict`: predicts doses (with the shipped model
when no --workdir is given).

The command lives in `randose_jax/cli/predict.py` (also `randose-predict`).
"""

from randose_jax.cli.predict import run

if __name__ == "__main__":
  run()
