"""Hugging Face export and generation on top of megamu's checkpoints.

source.py reads a run's weights from any layout; fold.py folds μP's multipliers into them; llama.py and
gpt2.py map them onto transformers' classes; tokenizer.py writes the tokenizer; hf.py puts these together
into a model directory.
"""
from megamu.export.hf import Exported, export_run, hf_model

__all__ = ["Exported", "export_run", "hf_model"]
