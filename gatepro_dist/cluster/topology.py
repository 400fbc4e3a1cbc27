"""Learn this process's place in the job from the launcher's environment, and join the job.

Launch concerns only: nothing here knows about models or training. One function reads the
launcher's variables (`detect_topology`, pure, in this order):

    torchrun   RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE (also set by our Docker entrypoint)
    Slurm      SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID, inside an `srun` step only
    Open MPI   OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE
    MPICH      PMI_RANK / PMI_SIZE / MPI_LOCALRANKID / MPI_LOCALNRANKS (Hydra, Intel MPI)
    PMIx       PMIX_RANK (the world size then comes from mpi4py)
    else       a single process

Slurm's variables are inherited by everything a batch script starts, so they count only inside an
`srun` step (the batch shell has SLURM_PROCID=0 too, but no SLURM_STEP_NUM_TASKS), and only when an
MPI launcher started inside the allocation does not contradict them (`mpirun` in `sbatch`).

`learn_topology` then finds the rendezvous address: MASTER_ADDR/MASTER_PORT when set; under Slurm
the first host of the step's node list (`scontrol show hostnames`), else SLURM_LAUNCH_NODE_IPADDR;
under MPI, rank 0's address broadcast with mpi4py (127.0.0.1 when every rank shares one host). An
address that does not resolve is a `TopologyError`, raised before any process group exists.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import zlib
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Callable, Mapping, Optional

import torch
import torch.distributed as dist

DEFAULT_PORT = 29500


class TopologyError(ValueError):
    """The launcher's environment is unusable; the message is one line naming the fix."""


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: Optional[int]  # None only for PMIx before `learn_topology` asked MPI
    local_rank: int
    local_world_size: int
    source: str  # which launcher's variables were used
    master_addr: Optional[str] = None
    master_port: Optional[int] = None


# ---- pure detection -------------------------------------------------------------------------

def _int(env: Mapping[str, str], key: str, default: Optional[int] = None) -> Optional[int]:
    if key not in env or env[key] == "":
        return default
    try:
        return int(env[key])
    except ValueError:
        raise TopologyError(f"{key}={env[key]!r} is not an integer; fix or unset it") from None


def tasks_on_node(tasks_per_node: str, node_index: int) -> Optional[int]:
    """Slurm's compressed task counts, e.g. '2(x3),1' -> [2, 2, 2, 1]; the entry for `node_index`."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_index] if 0 <= node_index < len(counts) else None


def _mpi_world(env: Mapping[str, str]) -> Optional[tuple[int, int]]:
    """(rank, size) set by an MPI launcher (mpirun, mpiexec), if any."""
    if "OMPI_COMM_WORLD_SIZE" in env:
        return _int(env, "OMPI_COMM_WORLD_RANK", 0), _int(env, "OMPI_COMM_WORLD_SIZE")
    if "PMI_SIZE" in env:
        return _int(env, "PMI_RANK", 0), _int(env, "PMI_SIZE")
    return None


def _slurm(env: Mapping[str, str]) -> Optional[Topology]:
    if "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return None  # not an srun step (e.g. the batch shell itself)
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
    mpi = _mpi_world(env)
    if mpi is not None and mpi != (rank, world):
        return None  # mpirun/mpiexec inside the allocation: its variables describe this process
    local_world = None
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        local_world = tasks_on_node(spec, _int(env, "SLURM_NODEID", 0))
    local_world = local_world or _int(env, "SLURM_NTASKS_PER_NODE", 1)
    return Topology(rank, world, _int(env, "SLURM_LOCALID", 0), local_world, "slurm")


def detect_topology(environ: Optional[Mapping[str, str]] = None) -> Topology:
    """This process's rank, world and local rank, from the first launcher whose variables are set.

    Pure: reads only `environ` (default os.environ). MASTER_ADDR/MASTER_PORT are copied when set."""
    env = os.environ if environ is None else environ
    topo: Optional[Topology] = None
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        topo = Topology(_int(env, "RANK"), world, _int(env, "LOCAL_RANK", 0),
                        _int(env, "LOCAL_WORLD_SIZE", world), "torchrun")
    if topo is None:
        topo = _slurm(env)
    if topo is None and "OMPI_COMM_WORLD_SIZE" in env:
        topo = Topology(_int(env, "OMPI_COMM_WORLD_RANK", 0), _int(env, "OMPI_COMM_WORLD_SIZE"),
                        _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
                        _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1), "openmpi")
    if topo is None and "PMI_RANK" in env and "PMI_SIZE" in env:
        topo = Topology(_int(env, "PMI_RANK"), _int(env, "PMI_SIZE"), _int(env, "MPI_LOCALRANKID", 0),
                        _int(env, "MPI_LOCALNRANKS", 1), "mpich")
    if topo is None and "PMIX_RANK" in env:
        topo = Topology(_int(env, "PMIX_RANK"), None, 0, 1, "pmix")
    if topo is None:
        topo = Topology(0, 1, 0, 1, "single")
    if topo.world_size is not None and not (0 <= topo.rank < topo.world_size and topo.world_size >= 1):
        raise TopologyError(f"{topo.source} says rank {topo.rank} of world size {topo.world_size}; "
                            f"the launcher's variables are inconsistent (stale exports in your shell?)")
    if not 0 <= topo.local_rank < max(topo.local_world_size, 1):
        topo = replace(topo, local_world_size=topo.local_rank + 1)
    return replace(topo, master_addr=env.get("MASTER_ADDR") or None,
                   master_port=_int(env, "MASTER_PORT"))


def expand_hostlist(nodelist: str) -> list[str]:
    """Slurm host list syntax without scontrol: 'gpu[01-03,7],login' -> gpu01 gpu02 gpu03 gpu7 login;
    several bracket groups in one name expand as scontrol does ('r[1-2]n[3-4]' -> r1n3 r1n4 r2n3 r2n4)."""
    names, depth, start = [], 0, 0
    for i, char in enumerate(nodelist + ","):
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            names.append(nodelist[start:i])
            start = i + 1
    return [host for name in names if name for host in _expand_name(name)]


def _expand_name(name: str) -> list[str]:
    m = re.match(r"([^\[]*)\[([^\]]*)\](.*)", name)
    if m is None:
        return [name]
    prefix, ranges, rest = m.groups()
    tails = _expand_name(rest)
    hosts = []
    for item in ranges.split(","):
        lo, _, hi = item.partition("-")
        for i in range(int(lo), int(hi or lo) + 1):
            hosts.extend(f"{prefix}{str(i).zfill(len(lo))}{tail}" for tail in tails)
    return hosts


def default_port(topology: Topology, env: Mapping[str, str]) -> int:
    """A port every rank computes alike without talking: derived from the job's id when there is one."""
    if topology.source == "slurm" and "SLURM_JOB_ID" in env:
        job, step = _int(env, "SLURM_JOB_ID", 0), _int(env, "SLURM_STEP_ID", 0)
        return 10000 + (job * 16 + step) % 20000
    if "PMIX_NAMESPACE" in env:  # unique per mpirun
        return 10000 + zlib.crc32(env["PMIX_NAMESPACE"].encode()) % 20000
    return DEFAULT_PORT


# ---- finding the rendezvous (may run commands or MPI) ----------------------------------------

def slurm_head_node(env: Mapping[str, str], run: Callable = subprocess.run) -> Optional[str]:
    """First host of the step's (else the job's) node list; else SLURM_LAUNCH_NODE_IPADDR."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if nodelist:
        try:
            out = run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
            hosts = out.stdout.split() if out.returncode == 0 else []
        except (OSError, subprocess.SubprocessError):
            hosts = []
        hosts = hosts or expand_hostlist(nodelist)
        if hosts:
            return hosts[0]
    return env.get("SLURM_LAUNCH_NODE_IPADDR") or None


def _interface_address(ifname: str) -> Optional[str]:
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", ifname], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)", out)
    return m.group(1) if m else None


def _address_towards(peer_host: str) -> Optional[str]:
    """The local source address the kernel would use to reach `peer_host` (UDP connect sends nothing)."""
    try:
        peer = socket.getaddrinfo(peer_host, DEFAULT_PORT, socket.AF_INET)[0][4][0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, DEFAULT_PORT))
            return s.getsockname()[0]
    except OSError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_comm():
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def _mpi_rendezvous(topology: Topology, env: Mapping[str, str]) -> tuple[str, int]:
    """Rank 0's address and a free port, broadcast to every rank with mpi4py."""
    comm = _mpi_comm()
    single_node = topology.local_world_size == topology.world_size
    if comm is None:
        if single_node:
            return "127.0.0.1", topology.master_port or default_port(topology, env)
        raise TopologyError(f"{topology.source} job across nodes without MASTER_ADDR: install mpi4py "
                            f"(pip install 'gatepro_dist[mpi]') or export MASTER_ADDR=<rank 0's host>")
    hosts = comm.allgather(socket.gethostname())
    if comm.Get_rank() == 0:
        addr = "127.0.0.1" if len(set(hosts)) == 1 else None
        ifname = env.get("GLOO_SOCKET_IFNAME") or env.get("NCCL_SOCKET_IFNAME")
        if addr is None and ifname:
            addr = _interface_address(ifname.split(",")[0].lstrip("^="))
        if addr is None:
            addr = _address_towards(next(h for h in hosts if h != hosts[0])) or socket.getfqdn()
        chosen = (addr, topology.master_port or _free_port())
    else:
        chosen = None
    addr, port = comm.bcast(chosen, root=0)
    return addr, port


def learn_topology(environ: Optional[Mapping[str, str]] = None) -> Topology:
    """`detect_topology`, then the world size (PMIx) and a resolvable rendezvous address."""
    env = os.environ if environ is None else environ
    return find_rendezvous(complete_world(detect_topology(env)), env)


def complete_world(topo: Topology) -> Topology:
    """Under PMIx alone only MPI knows the world size and the ranks per node: ask mpi4py."""
    if topo.world_size is not None:
        return topo
    comm = _mpi_comm()
    if comm is None:
        raise TopologyError("launched by PMIx without a world size: install mpi4py "
                            "(pip install 'gatepro_dist[mpi]') or launch with torchrun, srun or mpirun")
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    return replace(topo, world_size=comm.Get_size(), local_rank=local.Get_rank(), local_world_size=local.Get_size())


def find_rendezvous(topo: Topology, environ: Optional[Mapping[str, str]] = None) -> Topology:
    """Fill in MASTER_ADDR/MASTER_PORT for this launcher; raise TopologyError if it does not resolve."""
    env = os.environ if environ is None else environ
    if topo.world_size == 1:
        return topo
    addr, port = topo.master_addr, topo.master_port
    if addr is None:
        if topo.source == "slurm":
            addr = slurm_head_node(env)
            if addr is None:
                raise TopologyError("Slurm step without SLURM_STEP_NODELIST, SLURM_JOB_NODELIST or "
                                    "SLURM_LAUNCH_NODE_IPADDR: export MASTER_ADDR=<first node>")
        elif topo.source in ("openmpi", "mpich", "pmix"):
            addr, port = _mpi_rendezvous(topo, env)
        else:
            raise TopologyError(f"{topo.source} set RANK/WORLD_SIZE but not MASTER_ADDR; "
                                f"export MASTER_ADDR=<rank 0's host> and MASTER_PORT")
    check_resolves(addr, topo.source)
    return replace(topo, master_addr=addr, master_port=port or default_port(topo, env))


def check_resolves(addr: str, source: str) -> None:
    try:
        socket.getaddrinfo(addr, None)
    except (socket.gaierror, UnicodeError):
        raise TopologyError(f"MASTER_ADDR '{addr}' (from {source}) does not resolve to an address; "
                            f"set MASTER_ADDR to the first node's hostname or IP") from None


# ---- joining ---------------------------------------------------------------------------------

def pick_device(topology: Topology, backend: str) -> torch.device:
    if backend == "nccl" or (backend == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(topology.local_rank)
        return torch.device("cuda", topology.local_rank)
    return torch.device("cpu")


def export_environment(topology: Topology, environ=None) -> None:
    """Write the torchrun-style variables that `env://`, DeviceMesh and DCP read."""
    env = os.environ if environ is None else environ
    values = {"RANK": topology.rank, "WORLD_SIZE": topology.world_size, "LOCAL_RANK": topology.local_rank,
              "LOCAL_WORLD_SIZE": topology.local_world_size, "MASTER_ADDR": topology.master_addr,
              "MASTER_PORT": topology.master_port}
    for key, value in values.items():
        if value is not None:
            env[key] = str(value)


def init_distributed(topology: Topology, backend: str, timeout_s: float) -> torch.device:
    """Join the default process group (when there is more than one process); return the device."""
    device = pick_device(topology, backend)
    if topology.world_size > 1 and not dist.is_initialized():
        export_environment(topology)
        # GPUs: NCCL for device tensors, gloo for host control messages (docs/training.md).
        chosen = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(chosen, init_method="env://", rank=topology.rank,
                                world_size=topology.world_size, timeout=timedelta(seconds=timeout_s))
    return device


def rank_map(topology: Topology, groups) -> Optional[str]:
    """Collective: a table of rank -> host -> EP group, returned on rank 0 (None elsewhere)."""
    mine = (groups.rank, socket.gethostname(), topology.local_rank, groups.dp_rank, groups.ep_rank)
    if groups.world_size > 1:
        rows: list = [None] * groups.world_size
        dist.all_gather_object(rows, mine)
    else:
        rows = [mine]
    if not groups.is_main:
        return None
    width = max(len("host"), *(len(r[1]) for r in rows))
    lines = [f"rank map ({topology.source}; world {groups.world_size} = dp {groups.dp} x ep {groups.ep}; "
             f"rendezvous {topology.master_addr or '-'}:{topology.master_port or '-'})",
             f"  {'rank':>4}  {'host':<{width}}  {'local':>5}  {'ep_group':>8}  {'ep_rank':>7}"]
    lines += [f"  {r:>4}  {h:<{width}}  {lr:>5}  {g:>8}  {e:>7}" for r, h, lr, g, e in rows]
    return "\n".join(lines)
