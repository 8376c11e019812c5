"""The transformer as a DeepSpeed PipelineModule: the same layers, μP, names and init as `Transformer`.

Pipeline layer i is `Transformer.layers[i]` (embedding, the blocks, final norm, readout). DeepSpeed registers
it as module "i", so a stage's parameter "3.attn.q.weight" is the Transformer's "layers.3.attn.q.weight",
its logical name (`model.transformer.logical_name`). Init is keyed by the logical name: a PP=k model's
weights are the PP=1 model's.

Stages own whole blocks, `config.pipeline_blocks(cfg)[s]` on stage s; the first stage also holds the
embedding, the last the final norm and the readout, whose cross entropy (fused with it, or on its logits) is
the loss. The block split replaces DeepSpeed's own partitioning by overriding its `_partition_layers`, a private
method: setup.py bounds deepspeed below 0.20 so a change there cannot pass unnoticed.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn
from torch.distributed import ProcessGroup

from megamu.checkpoint.initial import load_initial_weights, read_initial_weights
from megamu.config import Config
from megamu.model import mup
from megamu.model.transformer import (LOGICAL_PREFIX, check_buildable, layer_builders, logical_name,
                                      stage_boundaries)
from megamu.parallel.layers import register_partial_grad_allreduce


class _BuiltBy(LayerSpec):
    """A LayerSpec made by one of megamu's builders (its layers take built sub-layers, not plain arguments)."""

    def __init__(self, typename: type[nn.Module], builder: Callable[[], nn.Module]) -> None:
        super().__init__(typename)
        self.builder = builder

    def build(self, log: bool = False) -> nn.Module:
        return self.builder()


class TransformerPipe(PipelineModule):
    """This rank's pipeline stage (of this TP rank), initialised by μP's rules under logical names."""

    def __init__(self, cfg: Config, topology, tp_group: Optional[ProcessGroup]) -> None:
        check_buildable(cfg, tp_group)
        self.boundaries = stage_boundaries(cfg)
        self.vocab_size = cfg.model.vocab_size
        specs = [_BuiltBy(typename, build) for typename, build in layer_builders(cfg, tp_group, pipeline=True)]
        super().__init__(layers=specs, topology=topology, loss_fn=self._loss)
        initial = read_initial_weights(cfg) if cfg.train.init_from else None
        for index, layer in zip(range(self._local_start, self._local_stop), self.forward_funcs):
            mup.init_weights(layer, cfg, prefix=f"{LOGICAL_PREFIX}.{index}")
            if initial is not None:
                load_initial_weights(layer, initial, cfg.train.init_from, prefix=f"{LOGICAL_PREFIX}.{index}")
        register_partial_grad_allreduce(self, tp_group)

    def _partition_layers(self, method: str = "parameters") -> None:
        # DeepSpeed balances parameter or layer counts; megamu splits by transformer blocks (config-set).
        self.parts = self.boundaries
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def _loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The last stage's loss from its last layer's output: the readout's input under the fused loss (the
        readout passes it on), otherwise the logits."""
        readout = self.forward_funcs[-1]
        if readout.pass_input:
            return readout.loss_from_input(output, labels, self.vocab_size)
        return readout.loss(output, labels, self.vocab_size)

    def logical_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This stage's parameters under the names the PP=1 Transformer gives them."""
        return [(logical_name(index, name), param)
                for index, layer in zip(range(self._local_start, self._local_stop), self.forward_funcs)
                for name, param in layer.named_parameters()]
