"""Scoring predicted doses.

dose_dvh.py  the OpenKBP dose and DVH scores (the official rules)
clinical.py  clinical metrics per structure and the gamma pass rates
gamma.py     the global gamma index in JAX
report.py    the HTML report of an evaluation
"""
