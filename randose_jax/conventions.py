"""The conventions every module shares, each stated once (docs/design.md
sections 1 and 2): ROI and channel order, the parotid pair, the model's
input channels, the grid axes and their directions, the stored CT offset.
"""

import numpy as np

# Official channel order of the structure masks (OpenKBP).
ROI_NAMES = (
    "Brainstem",
    "SpinalCord",
    "RightParotid",
    "LeftParotid",
    "Esophagus",
    "Larynx",
    "Mandible",
    "PTV56",
    "PTV63",
    "PTV70",
)
OAR_NAMES = ROI_NAMES[:7]
TARGET_NAMES = ROI_NAMES[7:]  # PTV56, PTV63, PTV70
# The OAR channels a left/right flip exchanges (augmentation, TTA).
PAROTID_CHANNELS = (
    OAR_NAMES.index("RightParotid"),
    OAR_NAMES.index("LeftParotid"),
)

# The model's inputs and their channels (channels-last arrays).
INPUT_CHANNELS = {"ptv": 1, "ct": 1, "oar": len(OAR_NAMES)}
INPUT_KEYS = tuple(INPUT_CHANNELS)

# OpenKBP's grid; phantoms may declare another (docs/design.md section 1).
GRID_SHAPE = (128, 128, 128)
# Grid axes: 0 anterior -> posterior, 1 patient right -> left,
# 2 superior -> inferior (an axial slice has a constant axis-2 index).
# A batch (N, D, H, W, C) has them one axis later.
AP_AXIS, LR_AXIS, SI_AXIS = 0, 1, 2
# Unit vector (LPS: +x patient left, +y posterior, +z superior) along which
# each grid axis 0, 1, 2 increases.
AXIS_DIRECTIONS_LPS = np.array(
    [
        (0.0, 1.0, 0.0),  # axis 0: anterior -> posterior
        (1.0, 0.0, 0.0),  # axis 1: patient right -> left
        (0.0, 0.0, -1.0),  # axis 2: superior -> inferior
    ]
)

# Stored CT values are HU + CT_OFFSET; air (-1024 HU) is stored as 0 = absent.
CT_OFFSET = 1024.0
