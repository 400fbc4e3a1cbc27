"""GPU check of the Megatron GatePro router.  STATUS: NOT YET RUN.

Written in a session that had no GPU; nothing below ``main`` has executed yet. The pure helper
``load_megatron_weights`` is tested on CPU (tests/test_megatron_router.py); the rest needs CUDA,
because Megatron's MoE layer does (its router moves the weight to the GPU, its token dispatcher
creates CUDA streams). Run it on one CUDA GPU:

    python -m gatepro_dist.integrations.megatron_gpu_check --out megatron_gpu_check.json

Two checks, with TF32 off:

1. ``layer``: Megatron's ``MoELayer`` (EP=1, all-to-all dispatcher, ``GateProTopKRouter``) against our
   ``MoELayer`` holding the same weights. ``--dtype fp32``: ``SequentialMLP`` experts and our per-expert
   loop; same routing map, output and gradients (input, router weight, experts) to 1e-4. ``--dtype bf16``
   (the default): Megatron in bf16 parameters (``TEGroupedMLP`` when Transformer Engine is importable,
   else ``SequentialMLP``), ours with fp32 parameters under bf16 autocast on the grouped GEMM path, both
   fed the same bf16 tokens: the routing maps agree on >= 99% of tokens (the router is fp32 on both
   sides; only near-ties may differ) and output and gradients agree to 3e-2 (bf16 rounding of two
   different GEMM orders).
2. ``gpt``: a 2-layer Megatron ``GPTModel`` (fp32) whose MoE layers route with GatePro trains a few
   steps on the stdlib corpus: the loss must fall, and GatePro must have changed some tokens' top-k sets.

``megatron_moe_layer`` is also what ``gatepro-bench gpu`` times beside our layer (labelled by
``experts_label``: what its experts really ran), and ``run_checks`` is its ``megatron_check`` section.
Megatron's own launchers join a plain ``nccl`` group, and so do ``main`` and those sections (a world of
one); our trainer's ``cpu:gloo,cuda:nccl`` group is checked by the other sections.

Prints one JSON object and exits 0 when both pass, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

HIDDEN, FFN, EXPERTS, TOP_K, PENALTY = 64, 128, 8, 2, 1e-2


def megatron_expert_tensors(megatron_experts, grads: bool = False) -> tuple[list, list]:
    """Each expert's ``fc1`` [2F, D] and ``fc2`` [D, F] weights (or their gradients), from Megatron's
    ``SequentialMLP`` (``local_experts[e].linear_fc{1,2}.weight``) or ``TEGroupedMLP``
    (``linear_fc{1,2}.weight{e}``, one tensor per expert)."""
    def pick(w):
        return w.grad if grads else w.detach()

    if hasattr(megatron_experts, "local_experts"):
        local = list(megatron_experts.local_experts)
        return [pick(e.linear_fc1.weight) for e in local], [pick(e.linear_fc2.weight) for e in local]
    fc1, fc2 = megatron_experts.linear_fc1, megatron_experts.linear_fc2
    count = sum(1 for name, _ in fc1.named_parameters() if name.startswith("weight"))
    return [pick(getattr(fc1, f"weight{e}")) for e in range(count)], [pick(getattr(fc2, f"weight{e}")) for e in range(count)]


def load_megatron_weights(ours, router_weight_ND: torch.Tensor, megatron_experts) -> None:
    """Copy a Megatron MoE layer's weights into our ``MoELayer`` (all experts local, ep=1).

    Megatron's SwiGLU expert e: ``fc1.weight`` [2F, D] whose first F rows are the gate projection
    and last F the up projection (``glu``: silu(first half) * second half), ``fc2.weight`` [D, F].
    Ours: ``gate_up_proj[e]`` [D, 2F] (gate columns first), ``down_proj[e]`` [F, D].
    """
    fc1, fc2 = megatron_expert_tensors(megatron_experts)
    if len(fc1) != ours.experts.num_local_experts:
        raise ValueError(f"Megatron layer has {len(fc1)} local experts, ours {ours.experts.num_local_experts}")
    with torch.no_grad():
        ours.router.weight.copy_(router_weight_ND)
        for e, (fc1_FD, fc2_DF) in enumerate(zip(fc1, fc2)):
            ours.experts.gate_up_proj[e].copy_(fc1_FD.t())
            ours.experts.down_proj[e].copy_(fc2_DF.t())


def transformer_engine_version() -> str | None:
    try:
        import transformer_engine
    except Exception:  # not installed, or installed without its CUDA libraries
        return None
    return getattr(transformer_engine, "__version__", "unknown")


def experts_label(megatron_layer) -> str:
    """What a Megatron ``MoELayer``'s experts really are, for a timing row: ``SequentialMLP`` is a
    Python loop of one dense MLP per expert; ``TEGroupedMLP`` is Transformer Engine's grouped GEMM;
    ``GroupedMLP`` the legacy ``grouped_gemm`` package's."""
    kind = type(megatron_layer.experts).__name__
    te = transformer_engine_version()
    return f"{kind}, " + (f"Transformer Engine {te}" if te else "no Transformer Engine")


def _megatron_config(num_layers: int, aux_loss_coeff: float, hidden: int = HIDDEN, ffn: int = FFN,
                     experts: int = EXPERTS, top_k: int = TOP_K, dtype: torch.dtype = torch.float32,
                     grouped_gemm: bool = False, z_loss_coeff: float | None = None):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=num_layers, hidden_size=hidden, num_attention_heads=4, ffn_hidden_size=ffn,
        num_moe_experts=experts, moe_router_topk=top_k, moe_ffn_hidden_size=ffn, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, moe_router_dtype="fp32",
        moe_aux_loss_coeff=aux_loss_coeff, moe_z_loss_coeff=z_loss_coeff, moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=grouped_gemm, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=dtype, bf16=dtype == torch.bfloat16)


def megatron_moe_layer(device: torch.device, hidden: int = HIDDEN, ffn: int = FFN, experts: int = EXPERTS,
                       top_k: int = TOP_K, dtype: torch.dtype = torch.float32, use_te: bool = False,
                       aux_loss_coeff: float = 0.0, z_loss_coeff: float | None = None):
    """Megatron's ``MoELayer`` with the GatePro router: ``SequentialMLP`` experts, or ``TEGroupedMLP``
    (one grouped GEMM per projection) with ``use_te``. Needs ``init_model_parallel_of_one`` first."""
    from megatron.core.transformer.spec_utils import build_module

    from .megatron_router import gatepro_moe_module_spec

    spec = gatepro_moe_module_spec(experts, penalty=PENALTY, use_te=use_te, moe_grouped_gemm=use_te)
    config = _megatron_config(1, aux_loss_coeff, hidden, ffn, experts, top_k, dtype, grouped_gemm=use_te,
                              z_loss_coeff=z_loss_coeff)
    return build_module(spec, config=config).to(device)


def init_model_parallel_of_one() -> None:
    """Megatron's parallel state for one GPU (TP = PP = EP = 1) on the initialised default process group."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                             expert_model_parallel_size=1)
    model_parallel_cuda_manual_seed(0)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_layer(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    from ..moe.layer import MoELayer, MoESpec

    bf16 = dtype == torch.bfloat16
    use_te = bf16 and transformer_engine_version() is not None
    megatron = megatron_moe_layer(device, dtype=dtype, use_te=use_te)
    ours = MoELayer(MoESpec(hidden_size=HIDDEN, num_experts=EXPERTS, top_k=TOP_K, expert_ffn_dim=FFN,
                            penalty=PENALTY, aux_loss_coef=0.0, z_loss_coef=0.0, grouped_gemm=bf16)).to(device)
    load_megatron_weights(ours, megatron.router.weight.detach().float(), megatron.experts)

    gen = torch.Generator(device=device).manual_seed(0)
    x_SBD = torch.randn(32, 4, HIDDEN, device=device, generator=gen).to(dtype)
    grad_SBD = torch.randn(32, 4, HIDDEN, device=device, generator=gen).to(dtype)
    x_meg, x_ours = x_SBD.clone().requires_grad_(), x_SBD.float().requires_grad_()

    probs_TN, routing_map_TN = megatron.router(x_SBD)
    routing = ours.router(x_SBD.float().reshape(-1, HIDDEN))
    ours_map_TN = torch.zeros_like(routing_map_TN).scatter_(1, routing.experts_TK, True)

    out_meg, _bias = megatron(x_meg)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out_ours, _stats = ours(x_ours)
    out_meg.backward(grad_SBD)
    out_ours.backward(grad_SBD.float())

    fc1_grads, fc2_grads = megatron_expert_tensors(megatron.experts, grads=True)
    gate_up_grad = torch.stack([g.t() for g in fc1_grads]).float()
    down_grad = torch.stack([g.t() for g in fc2_grads]).float()
    errors = {
        "output": _relative_error(out_ours.float(), out_meg.float()),
        "input_grad": _relative_error(x_ours.grad, x_meg.grad.float()),
        "router_weight_grad": _relative_error(ours.router.weight.grad, megatron.router.weight.grad.float()),
        "gate_up_grad": _relative_error(ours.experts.gate_up_proj.grad, gate_up_grad),
        "down_grad": _relative_error(ours.experts.down_proj.grad, down_grad),
    }
    map_agreement = float((ours_map_TN == routing_map_TN).all(dim=1).float().mean())
    tolerance, min_agreement = (3e-2, 0.99) if bf16 else (1e-4, 1.0)
    return {"dtype": str(dtype), "megatron_experts": experts_label(megatron),
            "routing_map_agreement": map_agreement, "gatepro_topk_changed": int(routing.gatepro_topk_changed),
            "relative_errors": errors,
            "passed": map_agreement >= min_agreement and max(errors.values()) < tolerance}


def check_gpt_training(device: torch.device, steps: int) -> dict:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from ..data import build_data
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
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="the layer check's dtype")
    parser.add_argument("--out", help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("megatron_gpu_check: needs a CUDA GPU (Megatron's MoE layer does not run on CPU)", file=sys.stderr)
        return 2

    import torch.distributed as dist
    from megatron.core import parallel_state

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    init_model_parallel_of_one()
    result = run_checks(device, torch.bfloat16 if args.dtype == "bf16" else torch.float32, args.steps)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0 if result["passed"] else 1


def run_checks(device: torch.device, dtype: torch.dtype, steps: int) -> dict:
    """Both checks, TF32 off (restored after), on an initialised Megatron parallel state of one GPU."""
    import megatron.core

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    result = {"megatron_core": megatron.core.__version__, "transformer_engine": transformer_engine_version(),
              "torch": torch.__version__, "device": torch.cuda.get_device_name(device)}
    for name, check in (("layer", lambda: check_layer(device, dtype)), ("gpt", lambda: check_gpt_training(device, steps))):
        try:
            result[name] = check()
        except Exception as err:  # report every check, even after one fails
            result[name] = {"passed": False, "error": f"{type(err).__name__}: {err}"}
    result["passed"] = all(result[name]["passed"] for name in ("layer", "gpt"))
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return result


if __name__ == "__main__":
    sys.exit(main())
