"""`gatepro-doctor`: a preflight check of the current allocation, launched exactly like training.

    torchrun --nproc-per-node 2 -m gatepro_dist.cluster.doctor --ep 2
    launch/torchrun.sh doctor    |    NP=2 launch/mpirun.sh doctor    |    srun gatepro-doctor

It joins the job the way gatepro-train does (same topology detection, same groups), then reports:
backend, world and EP groups, a dispatch/combine-like all-to-all round trip and an all-gather of
gate-sized rows over the EP group (payload checked, bandwidth measured), /dev/shm, the NCCL/Gloo
environment, and a plain-language diagnosis. Exit 0 when nothing failed, 1 otherwise, 2 on bad
input (e.g. an unresolvable MASTER_ADDR).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time

import torch
import torch.distributed as dist

from ..train.parallel import build_parallel_groups, close_process_groups, exit_process
from .topology import TopologyError, init_distributed, learn_topology

ENV_PATTERN = re.compile(r"^(NCCL_|GLOO_|TORCH_NCCL_|TORCH_DISTRIBUTED|MASTER_ADDR$|MASTER_PORT$|WORLD_SIZE$"
                         r"|LOCAL_WORLD_SIZE$|OMP_NUM_THREADS$|CUDA_VISIBLE_DEVICES$|FI_|UCX_|SLURM_JOB_ID$"
                         r"|SLURM_JOB_NODELIST$|OMPI_COMM_WORLD_SIZE$|PMI_SIZE$)")
# torch renamed all_gather_into_tensor; use whichever this version has without a warning.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
SHM_WANTED = 1 << 30  # NCCL's shared-memory transport and data loaders want more than Docker's 64 MiB


def _shm_bytes(path: str = "/dev/shm") -> tuple[int, int]:
    try:
        st = os.statvfs(path)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    except OSError:
        return 0, 0


def _facts(topology, device) -> dict:
    total, free = _shm_bytes()
    return {"host": socket.gethostname(), "local_rank": topology.local_rank, "torch": torch.__version__,
            "device": str(device), "cuda_devices": torch.cuda.device_count(), "cpus": os.cpu_count(),
            "shm_total": total, "shm_free": free,
            "env": {k: v for k, v in sorted(os.environ.items()) if ENV_PATTERN.match(k)}}


def _timed(fn, iters: int, device) -> float:
    """Seconds per call, the slowest rank's (a collective is as fast as its slowest member)."""
    fn()  # warm-up: connections, buffers
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    dist.barrier()
    began = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    elapsed = torch.tensor([(time.perf_counter() - began) / iters], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def measure(group, group_size: int, rank_in_group: int, size_bytes: int, iters: int, device) -> dict:
    """All-to-all there and back (like dispatch + combine) and an all-gather, over `group`."""
    n = group_size
    per_peer = max(1, size_bytes // (4 * n))
    # Every element says where it came from and where it goes, so a wrong route is caught.
    sent = (rank_in_group * 1000 + torch.arange(n, device=device, dtype=torch.float32)).repeat_interleave(per_peer)
    there, back = torch.empty_like(sent), torch.empty_like(sent)

    def round_trip():
        dist.all_to_all_single(there, sent, group=group)
        dist.all_to_all_single(back, there, group=group)

    t_a2a = _timed(round_trip, iters, device)
    expected = (torch.arange(n, device=device, dtype=torch.float32) * 1000 + rank_in_group).repeat_interleave(per_peer)
    a2a_ok = bool(torch.equal(there, expected) and torch.equal(back, sent))

    rows = torch.full((max(1, size_bytes // (4 * n)),), float(rank_in_group), device=device)
    gathered = torch.empty(n * rows.numel(), device=device)
    t_ag = _timed(lambda: _all_gather_flat(gathered, rows, group=group), iters, device)
    owners = torch.arange(n, device=device, dtype=torch.float32).repeat_interleave(rows.numel())
    ag_ok = bool(torch.equal(gathered, owners))

    a2a_bytes = 2 * sent.numel() * 4  # sent per rank per round trip
    ag_bytes = gathered.numel() * 4  # received per rank
    frac = (n - 1) / n  # the share that actually crosses between ranks (bus bandwidth)
    return {
        "all_to_all_round_trip": {"ok": a2a_ok, "bytes_per_rank": a2a_bytes, "seconds": t_a2a,
                                  "algbw_GBps": a2a_bytes / t_a2a / 1e9, "busbw_GBps": a2a_bytes * frac / t_a2a / 1e9},
        "all_gather": {"ok": ag_ok, "bytes_per_rank": ag_bytes, "seconds": t_ag,
                       "algbw_GBps": ag_bytes / t_ag / 1e9, "busbw_GBps": ag_bytes * frac / t_ag / 1e9},
    }


def diagnose(report: dict) -> list[tuple[str, str]]:
    """(level, sentence) findings in plain language; level is ok, warn or fail."""
    out: list[tuple[str, str]] = []
    ranks, backend = report["ranks"], report["backend"]
    hosts = sorted({r["host"] for r in ranks})
    if report["world_size"] == 1:
        out.append(("ok", "one process, no process group: launch the doctor the way you launch training "
                          "(torchrun, srun, mpirun) to test the network"))
    else:
        out.append(("ok", f"{report['world_size']} ranks on {len(hosts)} host(s) joined with {backend}; "
                          f"EP groups of {report['ep']}: {report['ep_groups']}"))
    for name, m in report.get("collectives", {}).items():
        if not m["ok"]:
            out.append(("fail", f"{name} delivered wrong data: the network path corrupts or misroutes "
                                f"messages; rerun with NCCL_DEBUG=INFO and check the interfaces"))
    if len({r["torch"] for r in ranks}) > 1:
        out.append(("fail", f"ranks run different torch versions {sorted({r['torch'] for r in ranks})}; "
                            f"install the same build everywhere (or use one container image)"))
    small_shm = sorted({r["host"] for r in ranks if 0 < r["shm_total"] < SHM_WANTED})
    if small_shm:
        mib = min(r["shm_total"] for r in ranks if r["host"] in small_shm) >> 20
        out.append(("warn", f"/dev/shm is only {mib} MiB on {', '.join(small_shm)}: NCCL and data loaders "
                            f"need more; in Docker use --ipc=host or --shm-size=16g"))
    if "nccl" in backend:  # "nccl", or "cpu:gloo,cuda:nccl" as we start it
        for host in hosts:
            local = [r for r in ranks if r["host"] == host]
            if local[0]["cuda_devices"] < len(local):
                out.append(("fail", f"{host} runs {len(local)} ranks but sees {local[0]['cuda_devices']} "
                                    f"GPU(s); lower the ranks per node or fix CUDA_VISIBLE_DEVICES"))
    env0 = ranks[0]["env"]
    if len(hosts) > 1:
        ifname = "NCCL_SOCKET_IFNAME" if "nccl" in backend else "GLOO_SOCKET_IFNAME"
        if ifname not in env0:
            out.append(("warn", f"{ifname} is not set on a multi-host job: if a host name resolves to "
                                f"127.0.x.x, {backend} binds to loopback and peers cannot connect; set it to "
                                f"the cluster interface (e.g. {ifname}=eth0 or ib0)"))
        if env0.get("NCCL_IB_DISABLE") == "1" and "nccl" in backend:
            out.append(("warn", "NCCL_IB_DISABLE=1: inter-node traffic goes over TCP sockets"))
    for key in sorted({k for r in ranks for k in r["env"] if k.startswith(("NCCL_", "GLOO_"))}):
        if len({r["env"].get(key) for r in ranks}) > 1:
            out.append(("warn", f"ranks disagree on {key}; set it the same way for the whole job"))
    for host in hosts:
        local = [r for r in ranks if r["host"] == host]
        threads = int(local[0]["env"].get("OMP_NUM_THREADS", "0") or 0)
        if threads and threads * len(local) > (local[0]["cpus"] or 1):
            out.append(("warn", f"{host}: {len(local)} ranks x OMP_NUM_THREADS={threads} exceed its "
                                f"{local[0]['cpus']} CPUs; lower OMP_NUM_THREADS"))
    if all(m["ok"] for m in report.get("collectives", {}).values()) and report.get("collectives"):
        a2a = report["collectives"]["all_to_all_round_trip"]
        out.append(("ok", f"all-to-all round trip and all-gather are correct; all-to-all bus bandwidth "
                          f"{a2a['busbw_GBps']:.3f} GB/s per rank"))
        if "nccl" in backend and len(hosts) > 1 and a2a["busbw_GBps"] < 1.0:
            out.append(("warn", "inter-node bandwidth is below 1 GB/s: NCCL is probably using TCP; check "
                                "InfiniBand/RoCE (NCCL_DEBUG=INFO, /dev/infiniband in containers, NCCL_IB_HCA)"))
    return out


def format_report(report: dict) -> str:
    lines = [f"gatepro-doctor: {report['source']} launch, backend {report['backend']}, world {report['world_size']} "
             f"= dp {report['dp']} x ep {report['ep']}, rendezvous {report['rendezvous']}"]
    for rank, r in enumerate(report["ranks"]):
        lines.append(f"  rank {rank:>3}  host {r['host']}  local {r['local_rank']}  device {r['device']}  "
                     f"torch {r['torch']}  /dev/shm {r['shm_total'] >> 20} MiB ({r['shm_free'] >> 20} free)")
    for name, m in report.get("collectives", {}).items():
        lines.append(f"  {name:<22} {m['bytes_per_rank'] / 2**20:8.2f} MiB/rank  {m['seconds'] * 1e3:9.3f} ms  "
                     f"algbw {m['algbw_GBps']:.3f} GB/s  busbw {m['busbw_GBps']:.3f} GB/s  "
                     f"{'ok' if m['ok'] else 'WRONG DATA'}")
    lines.append("  environment (rank 0): " + (" ".join(f"{k}={v}" for k, v in report["ranks"][0]["env"].items())
                                               or "no NCCL/Gloo variables set"))
    lines.append("diagnosis:")
    lines += [f"  [{level}] {text}" for level, text in report["diagnosis"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatepro-doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ep", type=int, default=None, help="EP group size to test (default: ranks per node)")
    parser.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    parser.add_argument("--size-mb", type=float, default=4.0, help="payload per rank per collective (MiB)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="collective timeout")
    parser.add_argument("--json", default=None, help="also write the report as JSON here (rank 0)")
    args = parser.parse_args(argv)
    try:
        topology = learn_topology()
    except TopologyError as err:
        print(f"gatepro-doctor: error: {err}", file=sys.stderr)
        return 2
    ep = args.ep or topology.local_world_size
    if ep < 1 or topology.world_size % ep:
        print(f"gatepro-doctor: error: --ep {ep} does not divide the world size {topology.world_size}; "
              f"choose a divisor", file=sys.stderr)
        return 2
    device = init_distributed(topology, args.backend, args.timeout_s)
    groups = build_parallel_groups(ep, device.type)
    facts = {**_facts(topology, device), "ep_group": groups.dp_rank}
    if groups.world_size > 1:
        ranks: list = [None] * groups.world_size
        dist.all_gather_object(ranks, facts)
        size = int(args.size_mb * 2**20)
        collectives = measure(groups.ep_group or dist.group.WORLD, groups.ep if groups.ep > 1 else groups.world_size,
                              groups.ep_rank if groups.ep > 1 else groups.rank, size, args.iters, device)
    else:
        ranks, collectives = [facts], {}
    report = {"source": topology.source, "backend": dist.get_backend() if dist.is_initialized() else "none",
              "world_size": groups.world_size, "ep": groups.ep, "dp": groups.dp,
              "ep_groups": [[r for r, f in enumerate(ranks) if f["ep_group"] == g]
                            for g in sorted({f["ep_group"] for f in ranks})],
              "rendezvous": f"{topology.master_addr or '-'}:{topology.master_port or '-'}",
              "ranks": ranks, "collectives": collectives}
    report["diagnosis"] = diagnose(report)
    failed = any(level == "fail" for level, _ in report["diagnosis"])
    if groups.is_main:
        print(format_report(report), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1)
    close_process_groups()
    return 1 if failed else 0


if __name__ == "__main__":
    exit_process(main())
