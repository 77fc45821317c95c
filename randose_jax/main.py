"""`python -m randose_jax.main`: trains (the design card's entry point).

The command lives in `randose_jax/cli/train.py` (also `randose-train`).
"""

from randose_jax.cli.train import run

if __name__ == "__main__":
  run()
