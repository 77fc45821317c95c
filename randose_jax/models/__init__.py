"""The RANDose network and its building blocks (paper section 2).

`create_model(config.model)` is the entry point; the blocks are exported so a
reader (or a test) can use each equation on its own.
"""

from randose_jax.models.layers import AttentionFusion
from randose_jax.models.layers import ChannelAttention
from randose_jax.models.layers import ChannelSpatialAttention
from randose_jax.models.layers import CSA
from randose_jax.models.layers import Downsample
from randose_jax.models.layers import MSCSA
from randose_jax.models.layers import MSFE
from randose_jax.models.layers import PTVIntegration
from randose_jax.models.layers import SpatialAttention
from randose_jax.models.layers import UNetBlock
from randose_jax.models.layers import Upsample
from randose_jax.models.layers import resize_ptv
from randose_jax.models.randose import RANDose
from randose_jax.models.randose import Stage
from randose_jax.models.randose import create_model

__all__ = [
    "AttentionFusion", "ChannelAttention", "ChannelSpatialAttention", "CSA",
    "Downsample", "MSCSA", "MSFE", "PTVIntegration", "RANDose",
    "SpatialAttention", "Stage", "UNetBlock", "Upsample", "create_model",
    "resize_ptv",
]
