"""GPU check of the Megatron GatePro router.  STATUS: NOT YET RUN.

Written in a session that had no GPU; nothing below ``main`` has executed yet. The pure helper
``load_megatron_weights`` is tested on CPU (tests/test_megatron_router.py); the rest needs CUDA,
because Megatron's MoE layer does (its router moves the weight to the GPU, its token dispatcher
creates CUDA streams). Run it on one CUDA GPU:

    python -m gatepro_dist.integrations.megatron_gpu_check --out megatron_gpu_check.json

Two checks, both fp32 with TF32 off:

1. ``layer``: Megatron's ``MoELayer`` (EP=1, all-to-all dispatcher, ``SequentialMLP`` SwiGLU experts,
   ``GateProTopKRouter``) against our ``MoELayer`` holding the same weights: same routing map, same
   output, same gradients of input, router weight and experts.
2. ``gpt``: a 2-layer Megatron ``GPTModel`` whose MoE layers route with GatePro trains a few steps on
   the stdlib corpus: the loss must fall, and GatePro must have changed some tokens' top-k sets.

Prints one JSON object and exits 0 when both pass, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

HIDDEN, FFN, EXPERTS, TOP_K, PENALTY = 64, 128, 8, 2, 1e-2


def load_megatron_weights(ours, router_weight_ND: torch.Tensor, megatron_experts) -> None:
    """Copy a Megatron MoE layer's weights into our ``MoELayer`` (all experts local, ep=1).

    Megatron's SwiGLU expert e: ``fc1.weight`` [2F, D] whose first F rows are the gate projection
    and last F the up projection (``glu``: silu(first half) * second half), ``fc2.weight`` [D, F].
    Ours: ``gate_up_proj[e]`` [D, 2F] (gate columns first), ``down_proj[e]`` [F, D].
    """
    local = list(megatron_experts.local_experts)
    if len(local) != ours.experts.num_local_experts:
        raise ValueError(f"Megatron layer has {len(local)} local experts, ours {ours.experts.num_local_experts}")
    with torch.no_grad():
        ours.router.weight.copy_(router_weight_ND)
        for e, expert in enumerate(local):
            ours.experts.gate_up_proj[e].copy_(expert.linear_fc1.weight.t())
            ours.experts.down_proj[e].copy_(expert.linear_fc2.weight.t())


def _megatron_config(num_layers: int, aux_loss_coeff: float):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=FFN,
        num_moe_experts=EXPERTS, moe_router_topk=TOP_K, moe_ffn_hidden_size=FFN, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, moe_router_dtype="fp32",
        moe_aux_loss_coeff=aux_loss_coeff, moe_token_dispatcher_type="alltoall", use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_layer(device: torch.device) -> dict:
    from megatron.core.transformer.spec_utils import build_module

    from ..moe.layer import MoELayer, MoESpec
    from .megatron_router import gatepro_moe_module_spec

    megatron = build_module(gatepro_moe_module_spec(EXPERTS, penalty=PENALTY), config=_megatron_config(1, 0.0))
    megatron = megatron.to(device)
    ours = MoELayer(MoESpec(hidden_size=HIDDEN, num_experts=EXPERTS, top_k=TOP_K, expert_ffn_dim=FFN,
                            penalty=PENALTY, aux_loss_coef=0.0, z_loss_coef=0.0, grouped_gemm=False)).to(device)
    load_megatron_weights(ours, megatron.router.weight.detach(), megatron.experts)

    gen = torch.Generator(device=device).manual_seed(0)
    x_SBD = torch.randn(32, 4, HIDDEN, device=device, generator=gen)
    grad_SBD = torch.randn(32, 4, HIDDEN, device=device, generator=gen)
    x_meg, x_ours = x_SBD.clone().requires_grad_(), x_SBD.clone().requires_grad_()

    probs_TN, routing_map_TN = megatron.router(x_SBD)
    routing = ours.router(x_SBD.reshape(-1, HIDDEN))
    ours_map_TN = torch.zeros_like(routing_map_TN).scatter_(1, routing.experts_TK, True)

    out_meg, _bias = megatron(x_meg)
    out_ours, _stats = ours(x_ours)
    out_meg.backward(grad_SBD)
    out_ours.backward(grad_SBD)

    gate_up_grad = torch.stack([e.linear_fc1.weight.grad.t() for e in megatron.experts.local_experts])
    down_grad = torch.stack([e.linear_fc2.weight.grad.t() for e in megatron.experts.local_experts])
    errors = {
        "output": _relative_error(out_ours, out_meg),
        "input_grad": _relative_error(x_ours.grad, x_meg.grad),
        "router_weight_grad": _relative_error(ours.router.weight.grad, megatron.router.weight.grad),
        "gate_up_grad": _relative_error(ours.experts.gate_up_proj.grad, gate_up_grad),
        "down_grad": _relative_error(ours.experts.down_proj.grad, down_grad),
    }
    same_map = bool(torch.equal(ours_map_TN, routing_map_TN))
    return {"same_routing_map": same_map, "gatepro_topk_changed": int(routing.gatepro_topk_changed),
            "relative_errors": errors, "passed": same_map and max(errors.values()) < 1e-4}


def check_gpt_training(device: torch.device, steps: int) -> dict:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from ..train.data import build_data
    from .megatron_router import GateProTopKRouter, use_gatepro_router

    seq, batch = 64, 8
    spec = use_gatepro_router(get_gpt_layer_local_spec(num_experts=EXPERTS), penalty=PENALTY)
    model = GPTModel(config=_megatron_config(2, 1e-2), transformer_layer_spec=spec, vocab_size=256,
                     max_sequence_length=seq).to(device)
    routers = [m for m in model.modules() if isinstance(m, GateProTopKRouter)]
    changed = []

    def count_changes(router, inputs, _output):  # tokens whose top-k set GatePro changed
        logits_TN = (inputs[0].reshape(-1, HIDDEN).float() @ router.weight.float().t()).detach()
        plain = logits_TN.topk(TOP_K, dim=1).indices.sort(dim=1).values
        chosen = router.penalised_logits(logits_TN).topk(TOP_K, dim=1).indices.sort(dim=1).values
        changed.append(int((plain != chosen).any(dim=1).sum()))

    for router in routers:
        router.register_forward_hook(count_changes)
    data = build_data("stdlib", seq, 0.02, vocab_size=256, max_bytes=4 << 20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)
    causal_mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), 1)[None, None]
    losses = []
    for step in range(steps):
        inputs, targets = data.train.batch(torch.arange(step * batch, (step + 1) * batch).numpy())
        loss_BS = model(inputs.to(device), position_ids, causal_mask, labels=targets.to(device))
        loss = loss_BS.float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return {"routers": len(routers), "losses": losses, "gatepro_topk_changed": sum(changed),
            "passed": len(routers) == 2 and losses[-1] < losses[0] and sum(changed) > 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="GPT training steps")
    parser.add_argument("--out", help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("megatron_gpu_check: needs a CUDA GPU (Megatron's MoE layer does not run on CPU)", file=sys.stderr)
        return 2

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                             expert_model_parallel_size=1)
    model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)

    import megatron.core

    result = {"megatron_core": megatron.core.__version__, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device)}
    for name, check in (("layer", lambda: check_layer(device)), ("gpt", lambda: check_gpt_training(device, args.steps))):
        try:
            result[name] = check()
        except Exception as err:  # report every check, even after one fails
            result[name] = {"passed": False, "error": f"{type(err).__name__}: {err}"}
    result["passed"] = all(result[name]["passed"] for name in ("layer", "gpt"))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
