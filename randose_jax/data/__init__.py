"""The data layer: CSV -> `Patient` -> encoded arrays -> cache -> grain batches.

Modules (DEVELOPING.md has the module map):
  openkbp   the OpenKBP on-disk format: reading patients, writing predictions.
  phantoms  synthetic patients written in the same layout.
  encoding  docs/design.md section 2: network inputs/targets (dense and packed
            form) and back to Gy.
  cache     a compact random-access store of patients' voxel lists.
  augment   geometry-consistent augmentation of packed examples.
  pipeline  the grain training dataset.
"""
