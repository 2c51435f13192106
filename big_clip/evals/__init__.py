"""Evaluation parts used by `big_clip/evaluate.py`: spec strings, metrics, datasets, label files."""
