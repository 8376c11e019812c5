"""Using what was trained: Hugging Face export and import, generation and exact evaluation, on top of
megamu's checkpoints.

Export: source.py reads a run's weights from any layout; fold.py folds μP's multipliers into them;
llama.py and gpt2.py map them onto transformers' classes; tokenizer.py writes the tokenizer; hf.py puts
these together into a model directory. Import: importer.py (Llama's mapping inverted). Generation:
decode.py (KV cache) and sampling.py. Evaluation: bpb.py (exact bits per byte).
"""
from megamu.export.hf import Exported, export_run, hf_model

__all__ = ["Exported", "export_run", "hf_model"]
