"""Inference: from parameters to a dose.

forward.py     the model's inputs from a batch, test-time flips
predictor.py   the Predictor: encode -> windowed forward -> decode
restore.py     the parameters of a training working directory
shipped.py     the models shipped in the package (shipped_models/)
standalone.py  the jax.export artifact that runs without this package
"""
