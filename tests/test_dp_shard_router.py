"""``parallel.dp_shard`` and the router: FSDP gathers the router's rows again for its backward.

FSDP2 reshards a module's parameters after forward and gathers them again for backward in a hook
on the gradients of the module's output tensors. The router returns a ``Routing`` dataclass, and
torch 2.11 finds a module's output tensors with ``tree_flatten``
(``FSDPState._register_pre_backward_hook``), which does not look inside an unregistered dataclass;
torch 2.13 does. On 2.11 the router got no hook and, at ep=1, where the logits' matmul saved a
view of the gathered rows, backward read freed storage ("setStorage: sizes [8, 32] ... out of
bounds for storage of size 0"). ``shard_model`` registers ``Routing`` as a pytree node.

The test registers FSDP's pre-backward hooks as torch 2.11 does, so it shows the fix on the torch
that CI runs (2.13); on 2.11 the replacement is the library's own code. Without the fix it fails on
2.13 too, with the error above.
"""
from __future__ import annotations

import torch

from distributed import run_on_ranks
from test_trainer import tiny_config


def _hooks_found_as_in_torch_2_11() -> None:
    """FSDP's pre-backward hooks on what ``tree_flatten`` finds in a module's output (torch 2.11's
    ``FSDPState._register_pre_backward_hook``, verbatim): no tensor inside a dataclass gets one."""
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    from torch.utils._pytree import tree_flatten

    assert hasattr(FSDPState, "_register_pre_backward_hook"), "FSDP renamed the hook this test replaces"

    def register_pre_backward_hook(self, output):
        if not torch.is_grad_enabled():
            return output
        for t in tree_flatten(output)[0]:
            if torch.is_tensor(t) and t.requires_grad:
                t.register_hook(self._pre_backward)
        return output

    FSDPState._register_pre_backward_hook = register_pre_backward_hook


def _router_rows_and_gradients(rank: int, world: int, run_dir: str, overrides: list[str]) -> dict:
    """One forward and backward on a fixed global batch: each router's local rows after forward
    and the full gradient of every parameter."""
    from gatepro_dist.moe.comm import local_tensor
    from gatepro_dist.train.model import Transformer
    from gatepro_dist.train.optim import gradient_sync
    from gatepro_dist.train.parallel import build_parallel_groups, single_process_groups
    from gatepro_dist.train.sharding import shard_model

    cfg = tiny_config(run_dir, *overrides, world_size=world)
    groups = (build_parallel_groups(cfg.parallel.ep, "cpu", cfg.parallel.dp_shard) if world > 1
              else single_process_groups())
    model = Transformer(cfg, groups.ep_group, groups.edp_group)
    if groups.dp_shard:
        _hooks_found_as_in_torch_2_11()
        shard_model(model, cfg, groups)
    sync = gradient_sync(model, groups)

    def router_rows() -> list[tuple[int, ...]]:
        return [tuple(local_tensor(layer.router.weight).shape) for layer in model.moe_layers]

    tokens = torch.randint(0, cfg.model.vocab_size, (8, 16), generator=torch.Generator().manual_seed(7))
    mine = tokens.chunk(world)[rank]
    logits, stats = model(mine)
    rows_after_forward = router_rows()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), mine.roll(-1, 1).flatten())
    sync.arm(last_micro_batch=True)
    (loss + sum(s.loss for s in stats)).backward()
    sync.finish()
    grads = {name.replace("_fsdp_wrapped_module.", ""): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor")
                                                          else p.grad)
             for name, p in model.named_parameters()}
    return {"rows_after_forward": rows_after_forward, "grads": grads}


def test_dp_shard_router_backward_at_ep1_with_hooks_found_as_torch_2_11_finds_them(tmp_path):
    """World 2, ep=1: each rank's router has all 8 rows [8, 32], which FSDP shards over 2 EDP
    ranks and reshards after forward (each rank keeps [4, 32]). Backward gathers them again and
    every gradient equals one process's."""
    reference = _router_rows_and_gradients(0, 1, str(tmp_path / "one"), [])
    ranks = run_on_ranks(2, _router_rows_and_gradients, str(tmp_path / "two"), ["parallel.ep=1", "parallel.dp_shard=true"])
    assert reference["rows_after_forward"] == [(8, 32), (8, 32)]
    for rank, result in enumerate(ranks):
        assert result["rows_after_forward"] == [(4, 32), (4, 32)]
        assert set(result["grads"]) == set(reference["grads"])
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")
