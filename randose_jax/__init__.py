"""randose_jax: RANDose radiotherapy dose prediction in JAX/Flax."""

__version__ = "0.1.0"
