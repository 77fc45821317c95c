"""The RANDose network and its building blocks (paper section 2).

`create_model(config.model)` is the entry point; the blocks are exported so a
reader (or a test) can use each equation on its own. `blocks.py` holds the
paper's blocks, `randose.py` the network, `conv.py` how each conv is
computed (`Conv`, the factory every block receives).
"""

from randose_jax.models.blocks import AttentionFusion
from randose_jax.models.blocks import ChannelAttention
from randose_jax.models.blocks import ChannelSpatialAttention
from randose_jax.models.blocks import CSA
from randose_jax.models.blocks import Downsample
from randose_jax.models.blocks import MSCSA
from randose_jax.models.blocks import MSFE
from randose_jax.models.blocks import PTVIntegration
from randose_jax.models.blocks import SpatialAttention
from randose_jax.models.blocks import UNetBlock
from randose_jax.models.blocks import Upsample
from randose_jax.models.blocks import resize_ptv
from randose_jax.models.conv import Conv
from randose_jax.models.randose import RANDose
from randose_jax.models.randose import Stage
from randose_jax.models.randose import create_model
from randose_jax.models.randose import grid_factor
from randose_jax.models.randose import input_specs

__all__ = [
    "AttentionFusion",
    "ChannelAttention",
    "ChannelSpatialAttention",
    "Conv",
    "CSA",
    "Downsample",
    "MSCSA",
    "MSFE",
    "PTVIntegration",
    "RANDose",
    "SpatialAttention",
    "Stage",
    "UNetBlock",
    "Upsample",
    "create_model",
    "grid_factor",
    "input_specs",
    "resize_ptv",
]
