"""Parameter-name tables between big_clip and PyTorch CLIP implementations.

`tables.py` holds the machinery (an `Entry` per tensor, the transposes and fusions) and
the per-block tables; `hf.py` and `open_clip.py` list each format's tensors and config
fields. `big_clip/export.py` is the user-facing entry point (CLI, files, checkpoints).
"""
