"""Benchmarks: the operator's and the runtime's speed, side by side with their baselines.

Run them all with ``python bench/run.py`` (or ``python -m bench``); see ``bench/run.py``.
"""
