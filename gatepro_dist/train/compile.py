"""``train.compile``: torch.compile of each transformer block, the MoE layer left eager.

What is compiled: each ``Block``'s body (``Block._forward``: the norms, attention with RoPE, the
residual adds, a dense FFN). What is not: the MoE layer (router, dispatch, experts, combine),
excluded with ``torch.compiler.disable`` on its forward, which is a graph break at a known place:

- the all-to-all split sizes are a host read (``tolist`` of the exchanged counts), so the rows
  each rank receives -- every shape after dispatch -- are data-dependent; traced, each new split
  would recompile or need unbacked symbolic sizes everywhere downstream;
- the collectives (counts exchange, uneven ``all_to_all_single``, the router's all-gather) run on
  process groups dynamo would have to trace as functional collectives; eager they are exactly the
  calls the single-process equivalence tests check;
- ``grouped_mm`` takes per-expert offsets that come from that same data.

So one block makes two graphs (attention half, then the residual add after the MoE) around an
eager MoE layer. The MoE layer is most of the FLOPs of an MoE block, so the gain is the attention
half's: measured in docs/benchmarks.md.

Why the body and not the Block module: ``Block.forward`` wraps the body in activation
checkpointing (``train.activation_checkpointing=block``); non-reentrant checkpointing recomputes
its function in backward, outside any compile context. With the checkpoint *inside* the compiled
region (``block.compile()``), dynamo cannot turn it into its checkpoint operator (the MoE graph
break is inside), runs it eagerly, and backward recomputes the body eagerly: the saved tensors no
longer match the compiled forward's. Compiling the body itself makes forward and recompute call
the same compiled function. With ``moe`` checkpointing the checkpoint call wraps only the (eager)
MoE layer, so dynamo graph-breaks on it and it recomputes eagerly, as it ran. FSDP2 (applied after
this, ``parallel.dp_shard``) registers its hooks on the Block module, outside the compiled body:
parameters are gathered before it runs and, inlined as graph inputs, compile once whatever object
FSDP swaps in. Parameter names and checkpoints are unchanged (nothing is wrapped).

Identical blocks share their graphs: dynamo treats module parameters as graph inputs (its default
``inline_inbuilt_nn_modules``), so every block of the same kind reuses the first one's compiled
code instead of compiling its own.
"""
from __future__ import annotations

import torch
from torch import nn

from ..moe.layer import MoELayer


def compile_blocks(model: nn.Module) -> None:
    """Compile the body of every block of ``model.layers`` in place; MoE layers stay eager."""
    for block in model.layers:
        if isinstance(block.ffn, MoELayer):
            # Instance attribute: this layer only, nothing else that uses MoELayer changes.
            block.ffn.forward = torch.compiler.disable(block.ffn.forward)
        block._forward = torch.compile(block._forward)
