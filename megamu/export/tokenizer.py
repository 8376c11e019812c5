"""megamu's SentencePiece model as a transformers tokenizer that encodes and decodes exactly like it.

transformers builds its tokenizer from the SentencePiece file itself (vocabulary, BPE merges ranked by
piece score, byte fallback), with LlamaTokenizer's pipeline: no normalizer, spaces as "▁", a dummy
prefix only if the model has one (megamu trains without), bytes fused back on decode. A model that pipeline
cannot reproduce (Unigram, a Unicode normalization, collapsed spaces) is refused. Two
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
from megamu.errors import DataError

BPE_MODEL_TYPE = 2  # SentencePiece's TrainerSpec.ModelType.BPE


def export_tokenizer(model_path: str, out_dir: str, max_length: int) -> Tokenizer:
    """Write the tokenizer files of SentencePiece model `model_path` into `out_dir`; returns megamu's view of it."""
    from transformers import LlamaTokenizer

    megamu_tokenizer = Tokenizer(model_path)  # a clear error for a missing or unreadable model
    spec = _model_proto(model_path)
    if problem := _unsupported(spec):
        raise DataError(f"tokenizer {model_path} {problem}, which LlamaTokenizer does not do: the export would not "
                        f"encode as SentencePiece does; export with a model from megamu-train-tokenizer")
    ids = {"unk_token": 0, "bos_token": megamu_tokenizer.bos_id, "eos_token": megamu_tokenizer.eos_id,
           "pad_token": megamu_tokenizer.pad_id}
    specials = {key: megamu_tokenizer.id_to_piece(i) for key, i in ids.items() if i is not None and i >= 0}
    with tempfile.TemporaryDirectory() as source:
        # transformers converts a SentencePiece file when it loads a directory holding it as tokenizer.model
        shutil.copyfile(model_path, os.path.join(source, "tokenizer.model"))
        hf_tokenizer = LlamaTokenizer.from_pretrained(
            source, add_bos_token=False, add_eos_token=False,
            add_prefix_space=spec.normalizer_spec.add_dummy_prefix, legacy=False,
            split_special_tokens=True, model_max_length=max_length, **specials)
    hf_tokenizer.save_pretrained(out_dir)
    return megamu_tokenizer


def _model_proto(model_path: str):  # type: ignore[no-untyped-def]
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _unsupported(proto) -> str:  # type: ignore[no-untyped-def]
    """What the SentencePiece model does that LlamaTokenizer's pipeline does not ('' when nothing)."""
    normalizer = proto.normalizer_spec
    problems = {"is not a BPE model": proto.trainer_spec.model_type != BPE_MODEL_TYPE,
                f"normalizes text ({normalizer.name})": bool(normalizer.precompiled_charsmap),
                "collapses runs of spaces (remove_extra_whitespaces)": normalizer.remove_extra_whitespaces}
    return "; ".join(what for what, present in problems.items() if present)
