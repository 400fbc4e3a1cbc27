"""Two "nodes" as two Linux network namespaces joined by a veth pair on a private /30, each with
its own hostname and /etc/hosts, one torchrun agent per node (launch/torchrun.sh, c10d
rendezvous, gloo bound to the veth): ep=2 across the nodes gives the single-node losses."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from launch_helpers import assert_same_losses, clean_env, losses, train_args

IFNAME = "gpv0"
SUBNET = f"10.231.{os.getpid() % 250}"  # a /30: .1 and .2, inside the namespaces only
PORT = "29411"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_nodes(tmp_path):
    """Namespaces A and B, each with lo and one end of the veth pair; removed afterwards."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        pytest.skip("network namespaces need root, iproute2 and util-linux unshare")
    names = [f"gpA{os.getpid()}", f"gpB{os.getpid()}"]
    try:
        ip("netns", "add", names[0])
    except subprocess.CalledProcessError as err:
        pytest.skip(f"cannot create a network namespace here: {err.stderr.strip()}")
    try:
        ip("netns", "add", names[1])
        ip("link", "add", IFNAME, "netns", names[0], "type", "veth", "peer", "name", IFNAME, "netns", names[1])
        for i, ns in enumerate(names, 1):
            ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/30", "dev", IFNAME)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", IFNAME, "up")
        hosts = tmp_path / "hosts"
        hosts.write_text(f"127.0.0.1 localhost\n{SUBNET}.1 gpnodeA\n{SUBNET}.2 gpnodeB\n")
        yield names, hosts
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # also removes the veth pair


def in_node(ns: str, hostname: str, hosts, cmd: list[str]) -> list[str]:
    """Run `cmd` in namespace `ns` with its own hostname and /etc/hosts (the host's stay as they are)."""
    script = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'
    return ["ip", "netns", "exec", ns, "unshare", "--uts", "--mount", "--", "sh", "-c", script, "sh",
            str(hosts), hostname, *cmd]


def rx_bytes(ns: str) -> int:
    out = subprocess.run(["ip", "-n", ns, "-s", "link", "show", IFNAME], capture_output=True, text=True).stdout
    return int(re.search(r"RX:.*\n\s*(\d+)", out).group(1))


@pytest.mark.slow
def test_two_namespace_nodes_train_ep2_with_the_single_node_losses(tmp_path, two_nodes):
    (ns_a, ns_b), hosts = two_nodes
    run_dir = tmp_path / "run"
    procs = []
    for node_rank, (ns, hostname) in enumerate([(ns_a, "gpnodeA"), (ns_b, "gpnodeB")]):
        env = clean_env(NNODES="2", NODE_RANK=str(node_rank), NPROC_PER_NODE="1", MASTER_ADDR="gpnodeA",
                        MASTER_PORT=PORT, RDZV_ID="netns-test", GLOO_SOCKET_IFNAME=IFNAME)
        cmd = in_node(ns, hostname, hosts, ["bash", "launch/torchrun.sh", *train_args(run_dir)])
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      cwd=os.path.dirname(os.path.dirname(__file__))))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            proc.kill()
    log = "\n".join(outputs)
    assert [p.returncode for p in procs] == [0, 0], log[-4000:]
    rank_map = [line.split() for line in log.splitlines() if re.match(r"\s+[01]\s+gpnode[AB]\s", line)]
    assert sorted(row[1] for row in rank_map) == ["gpnodeA", "gpnodeB"], log  # one rank per "node"
    assert "rank map (torchrun; world 2 = dp 1 x ep 2" in log
    assert_same_losses(losses(run_dir))
    assert rx_bytes(ns_a) > 100_000 and rx_bytes(ns_b) > 100_000  # the all-to-alls crossed the veth
