"""Exact bits per byte of a model on the validation split: every document's bits over its own bytes.

The trainer's `val_bpb` divides the loss by a dataset-average bytes-per-token; here each validation
document is scored whole and its bytes are counted exactly, as the UTF-8 length of its decoded text
(control tokens such as the end-of-document id decode to no bytes). bpb = Σ bits / Σ bytes over the split.

Each document is scored after the end-of-document id (what precedes it in the training stream), so
every one of its tokens, its own closing EOD included, is predicted once. A document longer than
model.seq_len is scored in consecutive windows of seq_len predictions, each conditioned only on its own
window (the context restarts at a window boundary, as a model of that context length must).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from megamu.config import Config, data_prefixes
from megamu.data.gpt_dataset import split_document_ranges
from megamu.data.indexed import IndexedDataset
from megamu.data.tokenizer import Tokenizer
from megamu.model.transformer import Transformer
from megamu.parallel.layers import IGNORE_INDEX


@dataclasses.dataclass
class BitsPerByte:
    documents: int
    tokens: int  # tokens predicted
    bytes: int
    bits: float

    @property
    def loss(self) -> float:
        """Mean loss per predicted token, in nats."""
        return self.bits * math.log(2) / max(self.tokens, 1)

    @property
    def bpb(self) -> float:
        return self.bits / self.bytes if self.bytes else math.nan


def validation_documents(cfg: Config, max_documents: Optional[int] = None) -> Iterator[np.ndarray]:
    """The token ids of every validation-split document of each data prefix (data.split's document ranges)."""
    emitted = 0
    for prefix in data_prefixes(cfg):
        with IndexedDataset(prefix) as dataset:
            start, end = split_document_ranges(cfg.data.split, dataset.num_documents)["valid"]
            for k in range(start, end):
                if max_documents is not None and emitted >= max_documents:
                    return
                yield np.concatenate(dataset.document(k)).astype(np.int64)
                emitted += 1


def windows(document: np.ndarray, start_id: int, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, labels) pairs, each at most seq_len long, that predict every token of `document` once."""
    stream = np.concatenate([[start_id], document])
    return [(stream[i:i + seq_len], stream[i + 1:i + 1 + seq_len]) for i in range(0, len(document), seq_len)]


@torch.no_grad()
def window_bits(model: Transformer, pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Σ −log2 p(label) over a batch of windows (shorter ones padded; padding is after, so causally unseen)."""
    length = max(len(inputs) for inputs, _ in pairs)
    inputs = torch.zeros(len(pairs), length, dtype=torch.long)
    labels = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.long)
    for row, (x, y) in enumerate(pairs):
        inputs[row, :len(x)], labels[row, :len(y)] = torch.from_numpy(x), torch.from_numpy(y)
    where = next(model.parameters()).device
    logits = model(inputs.to(where))[..., :model.vocab_size].float()
    nats = F.cross_entropy(logits.flatten(0, 1), labels.to(where).flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return nats.item() / math.log(2)


def exact_bits_per_byte(model: Transformer, cfg: Config, tokenizer: Tokenizer, max_documents: Optional[int] = None,
                        batch_size: int = 8) -> BitsPerByte:
    """Bits per byte of `model` (eval mode) over the validation split's documents (the first `max_documents`)."""
    total = BitsPerByte(0, 0, 0, 0.0)
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    for document in validation_documents(cfg, max_documents):
        total.documents += 1
        total.tokens += len(document)
        total.bytes += len(tokenizer.decode(document).encode("utf-8"))
        pending += windows(document, tokenizer.eod_id, cfg.model.seq_len)
        while len(pending) >= batch_size:
            total.bits += window_bits(model, pending[:batch_size])
            pending = pending[batch_size:]
    if pending:
        total.bits += window_bits(model, pending)
    return total
