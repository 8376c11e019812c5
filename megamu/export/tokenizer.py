"""megamu's SentencePiece model as a transformers tokenizer that encodes and decodes exactly like it.

transformers builds its tokenizer from the SentencePiece file itself (vocabulary, BPE merges ranked by
piece score, byte fallback), with LlamaTokenizer's pipeline: no normalizer, spaces as "▁", no dummy
prefix (`add_prefix_space=False`, as megamu trains without one), bytes fused back on decode. Three
settings make it behave as megamu's `Tokenizer.encode`: no BOS/EOS added (megamu's data has none but
the EOD after each document), and `split_special_tokens`, so text such as "</s>" is encoded as text, as
SentencePiece does, rather than as the special id. The result is a tokenizer.json that
`AutoTokenizer.from_pretrained` loads (class LlamaTokenizer) without sentencepiece installed.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from megamu.data.tokenizer import Tokenizer


def export_tokenizer(model_path: str, out_dir: str, max_length: int) -> Tokenizer:
    """Write the tokenizer files of SentencePiece model `model_path` into `out_dir`; returns megamu's view of it."""
    from transformers import LlamaTokenizer

    megamu_tokenizer = Tokenizer(model_path)  # a clear error for a missing or unreadable model
    ids = {"unk_token": 0, "bos_token": megamu_tokenizer.bos_id, "eos_token": megamu_tokenizer.eos_id,
           "pad_token": megamu_tokenizer.pad_id}
    specials = {key: megamu_tokenizer.id_to_piece(i) for key, i in ids.items() if i is not None and i >= 0}
    with tempfile.TemporaryDirectory() as source:
        # transformers converts a SentencePiece file when it loads a directory holding it as tokenizer.model
        shutil.copyfile(model_path, os.path.join(source, "tokenizer.model"))
        hf_tokenizer = LlamaTokenizer.from_pretrained(
            source, add_bos_token=False, add_eos_token=False, add_prefix_space=False, legacy=False,
            split_special_tokens=True, model_max_length=max_length, **specials)
    hf_tokenizer.save_pretrained(out_dir)
    return megamu_tokenizer
