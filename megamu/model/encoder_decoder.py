"""model.arch=t5: an encoder-decoder of llama's blocks (RMSNorm, SwiGLU, no biases) with cross-attention.

`layers` = [embedding, encoder blocks × n_layers, encoder norm, decoder blocks × n_layers, decoder norm,
readout], built by `layer_builders` like the decoders' list, so parameter names (`layers.i.…`), μP roles,
seeded init, TP/SP sharding, checkpoints and the coordinate check treat both alike. The token embedding is
shared by encoder and decoder (T5's); the readout is untied (T5 v1.1's). Positions: T5's relative-position
bias (one table per stack, shared by its layers: `encoder_bias`, `decoder_bias`), or RoPE in self-attention
with model.positions=rotary; cross-attention has none.

Inputs are the span-corruption samples of `megamu.data.span_corruption`: [B, 2, ≥ length] (encoder ids,
decoder ids), read up to the fixed lengths `config.span_layout` gives, and labels [B, ≥ decoder length]. The
encoder is bidirectional; the decoder is causal and sees the encoder only through cross-attention.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed import ProcessGroup

from megamu.config import Config, span_layout
from megamu.model.layers import RelativePositionBias


class EncoderDecoder(nn.Module):
    def __init__(self, cfg: Config, tp_group: Optional[ProcessGroup] = None) -> None:
        from megamu.model.transformer import layer_builders  # it builds this model's layers too

        super().__init__()
        layout = span_layout(cfg)
        self.encoder_len, self.decoder_len = layout.encoder_len, layout.decoder_len
        self.vocab_size, self.n_layers = cfg.model.vocab_size, cfg.model.n_layers
        self.layers = nn.ModuleList(build() for _, build in layer_builders(cfg, tp_group))
        self.encoder_bias = self.decoder_bias = None
        if cfg.relative_positions:
            self.encoder_bias = RelativePositionBias(cfg.model.n_heads, bidirectional=True, group=tp_group)
            self.decoder_bias = RelativePositionBias(cfg.model.n_heads, bidirectional=False, group=tp_group)

    def encode(self, encoder_ids: torch.Tensor) -> torch.Tensor:
        """[B, encoder_len] ids → the encoder's normalised output (sequence-sharded under SP)."""
        n = self.n_layers
        embedding, blocks, norm = self.layers[0], self.layers[1:n + 1], self.layers[n + 1]
        bias = self.encoder_bias(self.encoder_len, self.encoder_len) if self.encoder_bias is not None else None
        x = embedding(encoder_ids)
        for block in blocks:
            x = block(x, bias)
        return norm(x)

    def decode(self, decoder_ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """[B, decoder_len] ids and the encoder's output → the decoder's normalised output, the readout's input."""
        n = self.n_layers
        embedding, blocks, norm = self.layers[0], self.layers[n + 2:2 * n + 2], self.layers[2 * n + 2]
        bias = self.decoder_bias(self.decoder_len, self.decoder_len) if self.decoder_bias is not None else None
        y = embedding(decoder_ids)
        for block in blocks:
            y = block(y, memory, bias)
        return norm(y)

    def forward(self, inputs: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decoder logits [B, decoder_len, V_padded] (gathered over TP), or with `labels` the mean fp32 cross
        entropy of the decoder's predictions over the true vocabulary (labels -100 ignored)."""
        if inputs.dim() != 3 or inputs.shape[1] != 2 or inputs.shape[2] < max(self.encoder_len, self.decoder_len):
            raise ValueError(f"t5 inputs are [batch, 2, ≥{max(self.encoder_len, self.decoder_len)}] (encoder ids, "
                             f"decoder ids), got {list(inputs.shape)}")
        memory = self.encode(inputs[:, 0, :self.encoder_len])
        y = self.decode(inputs[:, 1, :self.decoder_len], memory)
        readout = self.layers[-1]
        if labels is None:
            return readout.gather_logits(readout(y))
        return readout.loss_from_input(y, labels[:, :self.decoder_len], self.vocab_size)
