"""Which engine trains: the one place that reads ``train.backend`` and hands the run to the native
trainer (``trainer.py``) or the DeepSpeed backend (``backends/deepspeed_trainer.py``). Both share
``step.py`` and neither imports the other.
"""
from __future__ import annotations

import torch

from ..cluster.preemption import PreemptionWatch
from ..config import Config
from .parallel import ParallelGroups
from .step import TrainResult


def train(cfg: Config, groups: ParallelGroups, device=torch.device("cpu"), data=None, log=print,
          preemption: PreemptionWatch | None = None) -> TrainResult:
    """Train ``cfg`` on ``groups`` with the engine ``cfg.train.backend`` names."""
    if cfg.train.backend == "deepspeed":
        from ..backends.deepspeed_trainer import train as engine  # imports DeepSpeed: only when asked for
    else:
        from .trainer import train as engine
    return engine(cfg, groups, device, data, log, preemption)
