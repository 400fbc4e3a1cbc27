"""From a step's device statistics to a metrics line, for both engines.

``StepStats`` sums the MoE statistics of a step's micro-batches on the device; ``read_step`` reduces
them over the world and reads them, with the loss and the gradient norm, in one host copy per step;
``LogWindow`` sums the host numbers of the steps between two metrics lines (``train.log_every``) and
writes the line: per-expert counts, drops and GatePro counts summed over the window, losses and norms
averaged, so a line with ``log_every=5`` describes five steps, not the fifth alone.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from ..moe import comm
from ..moe.layer import MoEStats
from ..moe.routing import margin_summary
from .parallel import ParallelGroups

# A layer's summed counts, in the order StepStats stacks them.
COUNTED = ("dropped", "penalised", "changed", "assignments", "co_selected", "tokens")
# An expert is dead when its share of a layer's assignments over the last DEAD_WINDOW steps is
# below DEAD_SHARE / num_experts: unlike the zero-token count, this does not depend on the batch
# size (an expert with a 1% share is "used" at 2,048 tokens a step and at 10^6).
DEAD_WINDOW = 10
DEAD_SHARE = 0.1


def dead_experts(counts_per_step) -> int:
    """Experts whose share of the assignments summed over ``counts_per_step`` (one list of
    per-expert counts per step) is below ``DEAD_SHARE / num_experts``; all of them when nothing
    was assigned. Exact in integers: share < 0.1 / N  <=>  10 * count * N < total."""
    totals = [sum(column) for column in zip(*counts_per_step)]
    total, n = sum(totals), len(totals)
    return sum(round(1 / DEAD_SHARE) * count * n < total for count in totals) if total else n


class StepStats:
    """Per-layer MoE statistics summed over the micro-batches of one optimizer step.

    Everything stays on the device (0-dim and [N] tensors): ``read_step`` reduces a whole step's
    statistics with one collective per kind and reads them, with the loss and the gradient norm,
    in a single host copy.
    """

    def __init__(self):
        self.layers: list[dict] | None = None
        self.micro_batches = 0

    def add(self, stats: list[MoEStats]) -> None:
        if self.layers is None:
            self.layers = [dict(counts=torch.zeros_like(s.tokens_per_expert),
                                losses=torch.zeros(2, dtype=torch.float64, device=s.tokens_per_expert.device),
                                counted=torch.zeros(len(COUNTED), dtype=torch.long, device=s.tokens_per_expert.device),
                                rows_max=torch.zeros((), dtype=torch.long, device=s.tokens_per_expert.device),
                                margin=torch.zeros_like(s.routing_margin))
                           for s in stats]
        for acc, s in zip(self.layers, stats):
            acc["counts"] += s.tokens_per_expert
            acc["losses"] += torch.stack([s.aux_loss.detach(), s.z_loss.detach()]).to(torch.float64)
            acc["counted"] += torch.stack([s.dropped_tokens, s.gatepro_penalised, s.gatepro_topk_changed,
                                           s.tokens_per_expert.sum(), s.partner_co_selected, s.total_tokens])
            acc["rows_max"] = torch.maximum(acc["rows_max"], s.expert_rows_max)
            acc["margin"] += s.routing_margin
        self.micro_batches += 1


@dataclass
class LayerNumbers:
    """One MoE layer's numbers of one or more steps, on the host: what sums over steps, summed."""

    counts: list[int]  # assignments per expert (global)
    aux_loss: float  # summed over steps (divide by ``steps``)
    z_loss: float
    dropped: int
    penalised: int
    changed: int
    assignments: int
    co_selected: int  # tokens whose set held an expert and its most similar partner
    tokens: int
    rows_max: int  # the maximum over steps
    margin: list[int]  # routing-margin histogram counts
    steps: int = 1

    def merge(self, other: "LayerNumbers") -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.margin = [a + b for a, b in zip(self.margin, other.margin)]
        self.aux_loss += other.aux_loss
        self.z_loss += other.z_loss
        self.dropped += other.dropped
        self.penalised += other.penalised
        self.changed += other.changed
        self.assignments += other.assignments
        self.co_selected += other.co_selected
        self.tokens += other.tokens
        self.rows_max = max(self.rows_max, other.rows_max)
        self.steps += other.steps

    def entry(self, layer: int) -> dict:
        """The layer's entry of a metrics line (field names in ``train/metrics.py``)."""
        counts = self.counts
        return {
            "layer": layer, "zero_token_experts": sum(c == 0 for c in counts),
            "max_load": max(counts), "mean_load": sum(counts) / len(counts),
            "aux_loss": self.aux_loss / self.steps, "z_loss": self.z_loss / self.steps,
            "dropped_tokens": self.dropped, "drop_rate": self.dropped / max(self.assignments, 1),
            "expert_rows_max": self.rows_max, "gatepro_penalised": self.penalised,
            "gatepro_topk_changed": self.changed, "partner_co_selection": self.co_selected / max(self.tokens, 1),
            "tokens_per_expert": counts,
            "routing_margin": margin_summary(self.margin),
        }


@dataclass
class StepReadout:
    """A step's numbers on the host, the same on every rank."""

    loss: float  # global mean training loss
    grad_norm: float
    finite: bool  # loss and gradient norm finite on every rank
    layers: list[LayerNumbers]

    @property
    def moe(self) -> list[dict]:
        """One metrics entry per MoE layer, of this step alone."""
        return [numbers.entry(i) for i, numbers in enumerate(self.layers)]


def read_step(loss_sum: torch.Tensor, grad_accum: int, grad_norm: torch.Tensor, step_stats: StepStats,
              groups: ParallelGroups) -> StepReadout:
    """Reduce a step's loss and statistics over the world and read them in one host copy.

    ``loss_sum`` is this rank's summed micro-batch loss (a device tensor). The one read is
    inherent: the host decides whether to apply the update and writes the metrics line. The
    finite flag is summed over the world, so every rank takes the same decision even when only
    one rank's gradients went bad after the reduction.
    """
    layers = step_stats.layers or []
    n = max(step_stats.micro_batches, 1)
    device = loss_sum.device
    grad_norm = torch.as_tensor(grad_norm, dtype=torch.float64).to(device)
    # Summed over the world: the mean loss, each layer's (aux, z) share, the non-finite flag, and
    # each layer's routing-margin counts (this rank's tokens; float64 holds them exactly).
    world_sum = torch.cat([(loss_sum.to(torch.float64) / grad_accum).reshape(1),
                           *(acc["losses"] / n for acc in layers),
                           (~torch.isfinite(grad_norm)).to(torch.float64).reshape(1),
                           *(acc["margin"].to(torch.float64) for acc in layers)])
    comm.all_reduce_sum(world_sum, groups.world_group)
    rows_max_L = torch.stack([acc["rows_max"] for acc in layers]) if layers else world_sum.new_zeros(0).long()
    comm.all_reduce_max(rows_max_L, groups.world_group)
    # Counts are global already (summed over EP and EDP in the layer).
    host = torch.cat([world_sum, grad_norm.reshape(1), rows_max_L.to(torch.float64),
                      *(acc["counted"].to(torch.float64) for acc in layers),
                      *(acc["counts"].to(torch.float64) for acc in layers)]).tolist()
    loss, *rest = host
    losses_L2, rest = rest[: 2 * len(layers)], rest[2 * len(layers):]
    bad_grad_ranks, *rest = rest
    margin_width = layers[0]["margin"].numel() if layers else 0
    margins, (norm, *rest) = rest[: margin_width * len(layers)], rest[margin_width * len(layers):]
    rows_max, rest = rest[: len(layers)], rest[len(layers):]
    width = len(COUNTED)
    counted, rest = rest[: width * len(layers)], rest[width * len(layers):]
    out = []
    for i, acc in enumerate(layers):
        num_experts = acc["counts"].numel()
        dropped, penalised, changed, assignments, co_selected, tokens = (
            int(v) for v in counted[width * i:width * (i + 1)])
        out.append(LayerNumbers(
            counts=[int(c) for c in rest[i * num_experts:(i + 1) * num_experts]],
            aux_loss=losses_L2[2 * i] / groups.world_size, z_loss=losses_L2[2 * i + 1] / groups.world_size,
            dropped=dropped, penalised=penalised, changed=changed, assignments=assignments,
            co_selected=co_selected, tokens=tokens,
            rows_max=int(rows_max[i]), margin=[int(v) for v in margins[i * margin_width:(i + 1) * margin_width]]))
    loss /= groups.world_size
    return StepReadout(loss, norm, math.isfinite(loss) and bad_grad_ranks == 0, out)


@dataclass
class LogWindow:
    """The steps since the last metrics line, summed on the host (no device work, no read).

    ``add`` each step's readout; ``due`` says whether this step closes the window (every
    ``log_every`` steps, the last step, and any non-finite step, which is reported at once);
    ``record`` makes the line and opens a new window. Over a window the line's ``loss`` and
    ``grad_norm`` are means over its steps, ``lr`` and ``gatepro`` the last step's,
    ``tokens_per_s`` the window's tokens over its time, the time split (``data_s``, ...) a mean per
    step, and each layer's counts are summed (so
    ``zero_token_experts`` counts the experts that got no token in the whole window).
    ``steps_in_line`` appears when a line covers more than one step. What was measured at a step
    that writes no line (an evaluation, the router similarity) is ``note``d and goes on the next.
    ``dead_experts`` is over the last ``DEAD_WINDOW`` steps added, whatever the window (fewer
    right after a start or a resume).
    """

    log_every: int = 1
    notes: dict = field(default_factory=dict)  # for the next line: val_loss, similarity, skipped, ...
    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    layers: list[LayerNumbers] | None = None
    tokens: float = 0.0
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)  # phase -> seconds summed over the window (None: unknown)
    recent: deque = field(default_factory=lambda: deque(maxlen=DEAD_WINDOW))  # per step: each layer's counts

    def add(self, readout: StepReadout, tokens: float, seconds: float, phases: dict | None = None) -> None:
        for phase, value in (phases or {}).items():
            known = value is not None and self.phases.get(phase, 0.0) is not None
            self.phases[phase] = self.phases.get(phase, 0.0) + value if known else None
        self.losses.append(readout.loss)
        self.norms.append(readout.grad_norm)
        self.tokens += tokens
        self.seconds += seconds
        self.recent.append([numbers.counts for numbers in readout.layers])
        if self.layers is None:
            self.layers = [LayerNumbers(**vars(numbers)) for numbers in readout.layers]
        else:
            for mine, theirs in zip(self.layers, readout.layers):
                mine.merge(theirs)

    def note(self, **values) -> None:
        self.notes.update(values)

    def due(self, step_done: int, last_step: int, finite: bool = True) -> bool:
        return step_done % self.log_every == 0 or step_done == last_step or not finite

    def record(self, step_done: int, lr: float, gatepro_on: bool) -> dict:
        steps = len(self.losses)
        line = {"step": step_done, "loss": sum(self.losses) / steps, "lr": lr,
                "grad_norm": sum(self.norms) / steps, "tokens_per_s": self.tokens / max(self.seconds, 1e-12),
                "gatepro": gatepro_on, "moe": [numbers.entry(i) for i, numbers in enumerate(self.layers or [])]}
        line.update({phase: None if value is None else value / steps for phase, value in self.phases.items()})
        if steps > 1:
            line["steps_in_line"] = steps
        for layer, entry in enumerate(line["moe"]):
            entry["dead_experts"] = dead_experts([step[layer] for step in self.recent])
        for entry, similarity in zip(line["moe"], self.notes.pop("similarity", [])):
            entry["similarity"] = similarity
        line.update(self.notes)
        self.notes, self.losses, self.norms, self.layers, self.tokens, self.seconds = {}, [], [], None, 0.0, 0.0
        self.phases = {}
        return line
