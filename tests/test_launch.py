"""Topology detection for every launcher (pure functions of an env dict), the launch scripts' and
the Docker entrypoint's mapping of environment to command, and the one-line exit 2 on a bad
rendezvous address."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import pytest

from gatepro_dist.cluster.topology import (DEFAULT_PORT, Topology, TopologyError, default_port, detect_topology,
                                   expand_hostlist, learn_topology, slurm_head_node, tasks_on_node)
from launch_helpers import REPO, clean_env, run, train_args

SRUN_STEP = {  # task 3 of `srun -N2 --ntasks-per-node=2` inside job 4242
    "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]",
}


def test_torchrun_variables_come_first():
    env = {**SRUN_STEP, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "gpu07", "MASTER_PORT": "29400"}
    assert detect_topology(env) == Topology(5, 8, 1, 4, "torchrun", "gpu07", 29400)


def test_an_srun_step_gives_rank_world_and_ranks_per_node():
    assert detect_topology(SRUN_STEP) == Topology(3, 4, 1, 2, "slurm")


def test_the_batch_shell_is_not_a_launch_even_though_it_has_slurm_procid():
    batch = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4",
             "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert detect_topology(batch).source == "single"


def test_mpirun_inside_an_allocation_uses_the_mpi_variables():
    # prted was started by srun (one task per node), so the inherited Slurm view is per node.
    env = {**SRUN_STEP, "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "OMPI_COMM_WORLD_RANK": "6",
           "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    assert detect_topology(env) == Topology(6, 8, 2, 4, "openmpi")


def test_srun_with_pmi2_agreeing_with_slurm_stays_slurm():
    env = {**SRUN_STEP, "PMI_RANK": "3", "PMI_SIZE": "4"}
    assert detect_topology(env).source == "slurm"


def test_open_mpi_variables():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "PMIX_RANK": "1"}
    assert detect_topology(env) == Topology(1, 2, 1, 2, "openmpi")


@pytest.mark.parametrize("flavour", ["mpich", "intel-mpi"])
def test_mpich_and_intel_mpi_variables(flavour):
    env = {"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"}
    if flavour == "intel-mpi":
        env["I_MPI_ROOT"] = "/opt/intel/mpi"
    assert detect_topology(env) == Topology(5, 8, 1, 4, "mpich")


def test_pmix_alone_leaves_the_world_size_to_mpi():
    topo = detect_topology({"PMIX_RANK": "2", "PMIX_NAMESPACE": "prterun-x@1"})
    assert (topo.rank, topo.world_size, topo.source) == (2, None, "pmix")


def test_no_launcher_is_a_single_process():
    assert detect_topology({}) == Topology(0, 1, 0, 1, "single")


@pytest.mark.parametrize("env", [{"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}])
def test_inconsistent_launcher_variables_are_a_one_line_error(env):
    with pytest.raises(TopologyError) as err:
        detect_topology(env)
    assert "\n" not in str(err.value)


def test_slurm_host_lists_and_task_counts():
    assert expand_hostlist("gpu[07-09,11],login1") == ["gpu07", "gpu08", "gpu09", "gpu11", "login1"]
    assert expand_hostlist("a[1-2]-ib,b") == ["a1-ib", "a2-ib", "b"]
    assert expand_hostlist("r[1-2]n[3-4]") == ["r1n3", "r1n4", "r2n3", "r2n4"]
    assert [tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    assert tasks_on_node("8", 0) == 8 and tasks_on_node("8", 1) is None


HOSTLISTS = ["gpu[07-08]", "gpu[07-09,11],login1", "n[001-003],head", "r[1-2]n[3-4]", "r[1-2]n[3,5],x[01-02]"]


@pytest.fixture
def slurm_conf(tmp_path, monkeypatch):
    """The real scontrol (Debian slurm-wlm) needs a slurm.conf to start, not a running cluster."""
    if shutil.which("scontrol") is None:  # tests/run.sh installs Slurm: fail, do not skip
        pytest.fail("scontrol is not installed (bash launch/local_slurm.sh install)")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=hostlist\nSlurmctldHost=localhost\n"
                    "NodeName=localhost CPUs=1 State=UNKNOWN\nPartitionName=debug Nodes=localhost Default=YES\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    return conf


@pytest.mark.parametrize("nodelist", HOSTLISTS)
def test_host_lists_expand_as_scontrol_expands_them(slurm_conf, nodelist):
    real = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    assert real.returncode == 0, real.stderr
    assert expand_hostlist(nodelist) == real.stdout.split()


def test_head_node_comes_from_scontrol_then_the_node_list_then_the_launch_address(slurm_conf):
    calls = []

    def real_scontrol(cmd, **kwargs):  # the real command, recorded so the test knows it answered
        done = subprocess.run(cmd, **kwargs)
        calls.append((cmd, done.returncode))
        return done

    def missing(cmd, **_):
        raise FileNotFoundError(cmd[0])

    assert slurm_head_node({**SRUN_STEP, "SLURM_STEP_NODELIST": "r[1-2]n[3-4]"}, run=real_scontrol) == "r1n3"
    assert calls == [(["scontrol", "show", "hostnames", "r[1-2]n[3-4]"], 0)]
    assert slurm_head_node({"SLURM_JOB_NODELIST": "n[3-4]"}, run=missing) == "n3"
    assert slurm_head_node({"SLURM_LAUNCH_NODE_IPADDR": "10.0.0.9"}, run=missing) == "10.0.0.9"


def test_every_rank_of_a_step_derives_the_same_port_without_talking():
    ports = {default_port(detect_topology({**SRUN_STEP, "SLURM_PROCID": str(r)}), SRUN_STEP) for r in range(4)}
    assert len(ports) == 1 and 10000 <= ports.pop() < 30000
    assert default_port(detect_topology({}), {}) == DEFAULT_PORT


def test_learn_topology_takes_the_first_slurm_host_and_checks_it_resolves():
    env = {**SRUN_STEP, "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost"}
    topo = learn_topology(env)
    assert (topo.master_addr, topo.master_port) == ("localhost", default_port(topo, env))
    with pytest.raises(TopologyError, match="does not resolve"):
        learn_topology({**SRUN_STEP, "MASTER_ADDR": "no-such-host.invalid"})


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_unresolvable_master_addr_exits_2_with_one_line_before_any_group(tmp_path, launcher):
    env = clean_env(**({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "no-such-host.invalid",
                        "MASTER_PORT": "29999"} if launcher == "torchrun" else
                       {**SRUN_STEP, "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "no-such-node[1-2].invalid",
                        "SLURM_JOB_NODELIST": "no-such-node[1-2].invalid"}))
    if launcher == "slurm":
        env["SLURM_STEP_NUM_TASKS"] = env["SLURM_NTASKS"] = "2"
    proc = run([sys.executable, "-m", "gatepro_dist.cli.train", *train_args(tmp_path / "run")], env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gatepro-train: error: MASTER_ADDR"), proc.stderr
    assert "does not resolve" in lines[0] and launcher in lines[0]
    assert not (tmp_path / "run").exists()


# ---- launch scripts and the Docker entrypoint: the command they would run --------------------

def dry_run(script: str, *args: str, **env: str) -> list[str]:
    proc = run(["bash", script, *args], clean_env(GATEPRO_DRY_RUN="1", **env), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def flag(cmd: list[str], name: str):
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
    return values[0] if values else None


def test_torchrun_script_single_node_is_standalone_and_forwards_preemption_signals():
    cmd = dry_run("launch/torchrun.sh", "configs/quickstart.yaml", "train.steps=5", NPROC_PER_NODE="2")
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd
    assert flag(cmd, "--nproc-per-node") == "2" and flag(cmd, "--max-restarts") == "0"
    assert "SIGUSR1" in flag(cmd, "--signals-to-handle").split(",")
    assert cmd[-4:] == ["-m", "gatepro_dist.cli.train", "configs/quickstart.yaml", "train.steps=5"]


def test_torchrun_script_multi_node_uses_c10d_on_master_addr():
    cmd = dry_run("launch/torchrun.sh", "doctor", NNODES="2", NODE_RANK="0", MASTER_ADDR="node0",
                  MASTER_PORT="29444", NPROC_PER_NODE="8", RDZV_ID="job7")
    assert (flag(cmd, "--nnodes"), flag(cmd, "--rdzv-backend"), flag(cmd, "--rdzv-endpoint"),
            flag(cmd, "--rdzv-id"), flag(cmd, "--rdzv-conf")) == ("2", "c10d", "node0:29444", "job7", "is_host=1")
    assert cmd[-2:] == ["-m", "gatepro_dist.cluster.doctor"]
    proc = run(["bash", "launch/torchrun.sh", "x.yaml"], clean_env(NNODES="2"), timeout=60)
    assert proc.returncode == 2 and "MASTER_ADDR" in proc.stderr


def test_mpirun_script_runs_every_rank_without_pinning_and_as_root():
    # The Open MPI wheel (the `mpi` extra, installed by tests/run.sh) is first on clean_env's PATH.
    version = run(["mpirun", "--version"], clean_env(), timeout=60)
    assert "Open MPI" in version.stdout, version.stdout + version.stderr
    cmd = dry_run("launch/mpirun.sh", "configs/quickstart.yaml", NP="4")
    assert cmd[cmd.index("-n") + 1] == "4"
    assert cmd[cmd.index("--bind-to") + 1] == "none" and "--oversubscribe" in cmd
    assert cmd[-2:] == ["gatepro_dist.cli.train", "configs/quickstart.yaml"]
    # A launcher that is not Open MPI (`false --version` says nothing) gets none of its flags.
    other = dry_run("launch/mpirun.sh", "configs/quickstart.yaml", NP="4", MPIRUN="false")
    assert other[:3] == ["false", "-n", "4"] and "--bind-to" not in other and "--oversubscribe" not in other


def test_docker_entrypoint_maps_container_variables_to_torchrun():
    cmd = dry_run("docker/entrypoint.sh", "train", "configs/quickstart.yaml", "train.steps=9",
                  NNODES="2", NODE_RANK="1", MASTER_ADDR="10.1.2.3", MASTER_PORT="29500", NPROC_PER_NODE="4")
    assert (flag(cmd, "--nnodes"), flag(cmd, "--nproc-per-node"), flag(cmd, "--rdzv-endpoint"),
            flag(cmd, "--rdzv-conf")) == ("2", "4", "10.1.2.3:29500", "is_host=0")
    assert cmd[-4:] == ["-m", "gatepro_dist.cli.train", "configs/quickstart.yaml", "train.steps=9"]
    assert dry_run("docker/entrypoint.sh")[-2:] == ["-m", "gatepro_dist.cluster.doctor"]  # default command


def test_docker_entrypoint_under_slurm_runs_one_agent_per_node_or_every_rank_directly():
    per_node = {"SLURM_JOB_ID": "77", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "2",
                "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]", "NPROC_PER_NODE": "8"}
    cmd = dry_run("docker/entrypoint.sh", "train", "c.yaml", **per_node)
    assert (flag(cmd, "--nnodes"), flag(cmd, "--rdzv-id"), flag(cmd, "--rdzv-endpoint")) == \
        ("2", "77", f"gpu07:{10000 + 77 % 20000}")
    assert flag(cmd, "--rdzv-conf") is None  # no NODE_RANK guess: c10d picks the store's host
    per_rank = {**per_node, "SLURM_STEP_NUM_TASKS": "16"}
    assert dry_run("docker/entrypoint.sh", "train", "c.yaml", **per_rank)[1:] == \
        ["-m", "gatepro_dist.cli.train", "c.yaml"]


def test_docker_entrypoint_runs_other_commands_as_they_are():
    proc = run(["bash", "docker/entrypoint.sh", "echo", "hello"], clean_env(), timeout=30)
    assert (proc.returncode, proc.stdout) == (0, "hello\n")


def test_compose_file_describes_two_host_network_nodes_with_shared_memory():
    import yaml

    compose = yaml.safe_load((REPO / "docker/compose.yaml").read_text())
    nodes = compose["services"]
    assert sorted(nodes) == ["node0", "node1"]
    for rank, name in enumerate(["node0", "node1"]):
        node = nodes[name]
        assert node["network_mode"] == "host" and node["ipc"] == "host" and node["shm_size"]
        env = node["environment"]
        assert (env["NODE_RANK"], env["NNODES"]) == (str(rank), "2")
        assert env["MASTER_ADDR"].startswith("${MASTER_ADDR:?")  # required, same on both nodes
        assert node["command"][0] == "train" and "train.resume=auto" in node["command"]
        assert node["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert (REPO / "docker" / node["build"]["context"] / node["build"]["dockerfile"]).is_file()
    assert "/dev/infiniband" in (REPO / "docker/compose.yaml").read_text()  # the IB hint is there


def test_dockerfile_uses_a_cuda_pytorch_base_and_installs_every_extra():
    text = (REPO / "docker/Dockerfile").read_text()
    base = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ARG BASE_IMAGE="))
    assert base.startswith("docker.io/pytorch/pytorch:") and "cuda" in base  # qualified: podman needs it
    assert "optional-dependencies" in text and "-c /tmp/keep-torch.txt" in text  # every extra, torch kept
    assert 'ENTRYPOINT ["gatepro-entrypoint"]' in text and "docker/entrypoint.sh" in text


def test_docker_compose_config_accepts_the_file(tmp_path):
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` on this machine (only the YAML checks above ran)")
    proc = subprocess.run([docker, "compose", "-f", str(REPO / "docker/compose.yaml"), "config", "--quiet"],
                          env=clean_env(MASTER_ADDR="10.0.0.1"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
