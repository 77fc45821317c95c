"""Convolution algorithms, apart from the model that uses them.

  conv_math.py     the 'SAME' stride-1 3D convolution, direct (lax) and
                   through the FFT (whole grid or overlap-save tiles)
  conv_planner.py  which algorithm each layer takes (a CPU cost model)

`randose_jax.models.conv.Conv`, the paper's convolution module, calls them.
"""
