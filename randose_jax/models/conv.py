"""The network's convolution module (docs/design.md section 3).

The blocks of `blocks.py` receive `Conv` as a module factory (built once by
`RANDose` as `functools.partial(Conv, impl=..., dtype=..., fuse_sums=...)`)
and never see which algorithm runs:

  conv(features, k)(x)            a k^3 'SAME' stride-1 conv
  conv_sum([conv_a, conv_b], x)   conv_a(x) + conv_b(x)       (MSFE)
  conv_each([conv_a, conv_b], x)  [conv_a(x), conv_b(x)]      (PI)
  conv(features, k).transposed(x) the stride-k transposed conv (Upsample)

Each conv has `nn.Conv`'s parameters ('kernel' (k, k, k, Cin, features),
'bias' (features,), float32, the same initialisers), and every algorithm
computes the same math from them (to float32 rounding):
  direct     lax's convolution.
  FFT        the whole grid in the frequency domain; convs of one input share
             its FFT, convs whose outputs are summed share one spectrum.
  tiled FFT  overlap-save tiles, so the spectra are the size of a tile.
The algorithms live apart from the model, in `randose_jax/ops/`
(`conv_math`: the direct and FFT maths; `conv_planner`: the choice).
`impl` ('direct' | 'fft' | 'auto', `config.model.conv_impl`) and
`plan_conv` choose per layer from the input shape and `backend` (the backend
the model was created for, `create_model`); the transposed conv is a lax
transposed conv or a matmul (`plan_transposed_conv`). `Conv.plan` is the
one place a layer's plan is made: `randose_jax.models.costs.conv_plan` lists
the plans of a network by intercepting it.

All arrays are channels-last, (N, D, H, W, C). Parameters are float32;
`dtype` is the compute dtype; the FFT path computes in float32.
"""

import functools
import operator
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from randose_jax.ops.conv_math import conv3d
from randose_jax.ops.conv_math import conv3d_fft
from randose_jax.ops.conv_math import pad_kernel
from randose_jax.ops.conv_planner import Plan
from randose_jax.ops.conv_planner import plan_conv
from randose_jax.ops.conv_planner import plan_transposed_conv

Dtype = Any
Array = jax.Array


# ------------------------------------------------------------ the factory


def _sum(arrays: Sequence[Array]) -> Array:
  """arrays[0] + arrays[1] + ..., in that order (one array: itself)."""
  return functools.reduce(operator.add, arrays)


class Conv(nn.Module):
  """`nn.Conv(features, (k, k, k), padding='SAME')` with a choice of algorithm.

  Same params as nn.Conv ('kernel' (k,k,k,Cin,features), 'bias', the same
  initialisers), same math. impl: 'direct' | 'fft' | 'auto' (`plan_conv`,
  per layer from the input shape); dtype: the compute dtype; fuse_sums:
  `conv_sum` on the direct path convolves once with the summed kernels
  (zero-padded, centred) instead of once per conv (same math, fewer taps).

  x: (N, D, H, W, Cin) -> (N, D, H, W, features).
  """

  features: int
  kernel_size: int
  impl: str = "direct"
  dtype: Dtype = jnp.float32
  fuse_sums: bool = False
  backend: str | None = None  # None: JAX's default backend

  @nn.compact
  def weights(self, in_features: int) -> tuple[Array, Array]:
    """kernel (k, k, k, in_features, features) and bias (features,)."""
    k = self.kernel_size
    kernel = self.param(
        "kernel",
        nn.initializers.lecun_normal(),
        (k, k, k, in_features, self.features),
        jnp.float32,
    )
    bias = self.param(
        "bias", nn.initializers.zeros_init(), (self.features,), jnp.float32
    )
    return kernel, bias

  def plan(self, x_shape, kernel_groups) -> Plan:
    """The plan of this conv and the convs computed with it (`conv_sum`,
    `conv_each`); `randose_jax.models.costs.conv_plan` intercepts this method.
    """
    return plan_conv(
        self.impl,
        x_shape,
        kernel_groups,
        self.features,
        self.fuse_sums,
        self.backend,
    )

  def __call__(self, x: Array) -> Array:
    return conv_sum([self], x)

  def transposed(self, x: Array) -> Array:
    """The stride-k transposed conv, k = kernel_size: nn.ConvTranspose(
    features, (k, k, k), strides k, 'VALID')'s params and math.

    x: (N, D, H, W, Cin) -> (N, kD, kH, kW, features). No two output voxels
    share an input tap, so it is also one matmul (Cin -> k^3 * features) and
    a depth-to-space reshape,
      y[k i + a, k j + b, k l + c] = x[i, j, l] @ kernel[k-1-a, k-1-b, k-1-c]
    (lax.conv_transpose flips nothing; its dilated-conv lowering reads the
    kernel mirrored).
    """
    kernel, bias = self.weights(x.shape[-1])
    k, dtype = self.kernel_size, self.dtype
    x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
    if plan_transposed_conv(self.impl, self.backend).algorithm == "direct":
      y = jax.lax.conv_transpose(
          x, kernel, (k, k, k), "VALID", rhs_dilation=(1, 1, 1)
      )
      return y + bias
    n, d, h, w, _ = x.shape
    y = jnp.einsum("ndhwi,abcio->ndahbwco", x, kernel[::-1, ::-1, ::-1])
    return y.reshape(n, k * d, k * h, k * w, self.features) + bias


def conv_sum(convs: Sequence[Conv], x: Array) -> Array:
  """convs[0](x) + convs[1](x) + ... computed together: one FFT of x and one
  spectrum, or (`fuse_sums`) one direct conv with the summed kernels.

  convs: `Conv`s of one factory (the first one's impl, dtype and fuse_sums
  decide), odd kernel sizes when there are several.
  """
  first = convs[0]
  weights = [c.weights(x.shape[-1]) for c in convs]
  kernels, biases = [w for w, _ in weights], [b for _, b in weights]
  plan = first.plan(x.shape, [[c.kernel_size for c in convs]])
  if plan.algorithm == "fft":
    return conv3d_fft(x, [kernels], _sum(biases), first.dtype, plan.tile)
  if len(convs) > 1 and first.fuse_sums:
    k_max = max(c.kernel_size for c in convs)
    return conv3d(
        x,
        _sum([pad_kernel(w, k_max) for w in kernels]),
        _sum(biases),
        first.dtype,
    )
  return _sum([conv3d(x, w, b, first.dtype) for w, b in weights])


def conv_each(convs: Sequence[Conv], x: Array) -> list[Array]:
  """[conv(x) for conv in convs], the FFT ones through one FFT of x, one
  mixing product and one inverse FFT (convs of one factory, one width)."""
  first = convs[0]
  weights = [c.weights(x.shape[-1]) for c in convs]
  plan = first.plan(x.shape, [[c.kernel_size] for c in convs])
  if plan.algorithm == "direct":
    return [conv3d(x, w, b, first.dtype) for w, b in weights]
  y = conv3d_fft(
      x,
      [[w] for w, _ in weights],
      jnp.concatenate([b for _, b in weights]),
      first.dtype,
      plan.tile,
  )
  f = first.features
  return [y[..., i * f : (i + 1) * f] for i in range(len(convs))]
