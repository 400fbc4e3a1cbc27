"""read_model_tensors (what exporters read: one process, no model) returns the live model's
tensors, values and not just shapes: a model at ep=2 whose every tensor was set to seeded values
(experts different on each rank) is saved by save_checkpoint and read back as global tensors."""
from __future__ import annotations

import zlib

import torch

from distributed import run_on_ranks
from gatepro_dist.config import config_hash
from gatepro_dist.moe.router import is_expert_parallel
from gatepro_dist.train.checkpoint import read_model_tensors, save_checkpoint
from gatepro_dist.train.model import Transformer
from gatepro_dist.train.parallel import build_parallel_groups
from test_trainer import tiny_config

EP = 2


def _save_live_model(rank: int, world: int, run_dir: str) -> dict:
    cfg = tiny_config(run_dir, f"parallel.ep={EP}", world_size=world)
    groups = build_parallel_groups(EP)
    model = Transformer(cfg, groups.ep_group, groups.edp_group)
    params = dict(model.named_parameters())
    expert = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            expert[name] = name in params and is_expert_parallel(params[name])
            seed = zlib.crc32(name.encode()) + (1000 * groups.ep_rank if expert[name] else 0)
            tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed)).to(tensor.dtype))
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(run_dir, 1, model, optimizer, groups, {"step": 1}, cfg.to_dict(), config_hash(cfg))
    return {name: (tensor.clone(), expert[name]) for name, tensor in model.state_dict().items()}


def test_read_model_tensors_equals_the_live_model_at_ep2(tmp_path):
    live = run_on_ranks(EP, _save_live_model, str(tmp_path))
    read = read_model_tensors(tmp_path / "checkpoints" / "step_00000001")
    assert sorted(read) == sorted(live[0])
    experts = [name for name, (_, expert) in live[0].items() if expert]
    assert any("experts" in name for name in experts) and any("router" in name for name in experts)
    for name, (tensor, expert) in live[0].items():
        if expert:  # rank r holds experts [r N/ep, (r+1) N/ep): the global tensor is the ranks' blocks in order
            expected = torch.cat([live[r][name][0] for r in range(EP)])
            assert not torch.equal(live[0][name][0], live[1][name][0]), name
        else:  # replicated: the same on every rank
            assert torch.equal(live[1][name][0], tensor), name
            expected = tensor
        assert read[name].dtype == expected.dtype and torch.equal(read[name], expected), name
