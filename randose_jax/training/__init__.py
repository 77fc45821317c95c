"""Training: the trainer and what only training needs.

train.py           the Trainer (state, jitted step, shardings) and
                   `train_and_evaluate`, the loop
losses.py          the region-aware loss (paper section 2.4)
checkpointing.py   orbax checkpoints: latest, best, corrupt ones set aside
validation.py      scoring the validation patients during training
metric_writers.py  metrics.jsonl and TensorBoard
runlock.py         one run per working directory
"""
