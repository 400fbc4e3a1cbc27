"""The Docker deployment, built and run for real with podman (docker/podman_check.sh): the image
from docker/Dockerfile on a CPU stand-in for the CUDA base, `doctor` in a container, two containers
as two nodes preempted by SIGTERM (both exit 75, checkpoint, resume), and docker/compose.yaml with
the CPU override. The fast tests check the launch pieces the containers rely on."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from launch_helpers import REPO, clean_env, run


def dry_run(script: str, *args: str, **env: str) -> list[str]:
    proc = run(["bash", script, *args], clean_env(GATEPRO_DRY_RUN="1", **env), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def local_addr(cmd: list[str]) -> str | None:
    values = [a.split("=", 1)[1] for a in cmd if a.startswith("--local-addr=")]
    return values[0] if values else None


def test_two_agents_on_one_host_get_distinct_rendezvous_names():
    """torchrun names an agent by --local-addr (else the host name) and its PID. Two containers on
    one host share the name and the PID, so node0 is named by MASTER_ADDR and node1 keeps its host
    name (or its own LOCAL_ADDR): the names differ and the rendezvous completes."""
    job = dict(NNODES="2", MASTER_ADDR="127.0.0.1", NPROC_PER_NODE="1")
    node0 = dry_run("docker/entrypoint.sh", "train", "c.yaml", NODE_RANK="0", **job)
    node1 = dry_run("docker/entrypoint.sh", "train", "c.yaml", NODE_RANK="1", **job)
    assert local_addr(node0) == "127.0.0.1" and local_addr(node1) is None
    assert local_addr(dry_run("docker/entrypoint.sh", "train", "c.yaml", NODE_RANK="1", LOCAL_ADDR="127.0.0.2",
                              **job)) == "127.0.0.2"
    assert local_addr(dry_run("launch/torchrun.sh", "c.yaml", NODE_RANK="0", LOCAL_ADDR="10.0.0.9", **job)) == "10.0.0.9"
    assert local_addr(dry_run("launch/torchrun.sh", "c.yaml", NODE_RANK="0", NPROC_PER_NODE="2")) is None  # one node


def test_entrypoint_appends_overrides_from_the_environment_to_train_only():
    cmd = dry_run("docker/entrypoint.sh", "train", "c.yaml", "a=1", GATEPRO_TRAIN_OVERRIDES="train.steps=6  b=2")
    assert cmd[-4:] == ["c.yaml", "a=1", "train.steps=6", "b=2"]
    assert dry_run("docker/entrypoint.sh", "doctor", GATEPRO_TRAIN_OVERRIDES="train.steps=6")[-2:] == \
        ["-m", "gatepro_dist.cluster.doctor"]


class ComposeLoader(yaml.SafeLoader):
    """Compose files may use `!reset` (drop what an earlier file set)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: "!reset")


def test_cpu_override_drops_the_gpus_and_sets_limits_a_container_may_set():
    cpu = yaml.load((REPO / "docker/compose.cpu.yaml").read_text(), Loader=ComposeLoader)["services"]
    base = yaml.safe_load((REPO / "docker/compose.yaml").read_text())["services"]
    assert sorted(cpu) == sorted(base) == ["node0", "node1"]
    for name, node in cpu.items():
        assert node["deploy"] == "!reset" and node["environment"]["NPROC_PER_NODE"] == "1"
        assert node["image"].startswith("${GATEPRO_IMAGE:-localhost/")
        # same keys and types as compose.yaml's, or merging fails; memlock within the 8 MiB default
        assert {k: type(v) for k, v in node["ulimits"].items()} == {"memlock": int, "nofile": int, "nproc": int}
        assert set(base[name]["ulimits"]) <= {"memlock", "stack"} and 0 < node["ulimits"]["memlock"] <= 8 << 20
        assert "train.steps=" in node["environment"]["GATEPRO_TRAIN_OVERRIDES"]
    assert base["node1"]["environment"]["LOCAL_ADDR"] == "${LOCAL_ADDR:-}" and "LOCAL_ADDR" not in base["node0"]["environment"]


def test_podman_check_refuses_a_stray_argument_in_one_line():
    proc = run(["bash", "docker/podman_check.sh", "a", "b"], clean_env(), timeout=30)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "at most one argument" in proc.stderr


def metrics_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(2400)  # cold: apt, wheels, debootstrap and three image layers; warm: a few minutes
def test_image_builds_and_two_containers_preempt_resume_and_compose_trains(tmp_path):
    began = time.monotonic()
    try:
        proc = subprocess.run(["bash", "docker/podman_check.sh", str(tmp_path)], cwd=REPO, env=clean_env(),
                              capture_output=True, text=True, timeout=2300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"docker/podman_check.sh ran past {e.timeout} s:\n{(e.stderr or b'')[-4000:]}")
    seconds = time.monotonic() - began
    out = proc.stdout + proc.stderr
    # No skip: a machine where podman cannot be installed or run fails here, with the script's reason.
    assert proc.returncode == 0, out[-8000:]
    assert "podman_check: PASSED" in proc.stdout

    codes = dict(line.split() for line in (tmp_path / "exit_codes.txt").read_text().splitlines())
    by_role = {re.sub(r"^gatepro-check-\d+[-_]", "", name): int(code) for name, code in codes.items()}
    assert by_role == {"doctor": 0, "node0": 75, "node1": 75, "node0-resumed": 0, "node1-resumed": 0,
                       "node0_1": 0, "node1_1": 0}, codes  # from `podman inspect`, not `podman wait`
    logs = {re.sub(r"^gatepro-check-\d+[-_]", "", p.stem): p.read_text() for p in tmp_path.glob("gatepro-check-*.log")}

    doctor = logs["doctor"]
    assert re.search(r"all_to_all_round_trip .* ok", doctor) and re.search(r"all_gather .* ok", doctor), doctor

    # Preempted: rank 0 names the step, both containers say they exit 75, the checkpoint is there.
    first = logs["node0"] + logs["node1"]
    stop = int(re.search(r"preempted by SIGTERM after step (\d+)", first).group(1))
    assert stop >= 3
    for node in ("node0", "node1"):
        assert f"gatepro-entrypoint: preempted after step {stop}; exiting with 75" in logs[node], logs[node][-3000:]
    run_dir = tmp_path / "runs" / "two-nodes"
    checkpoint = run_dir / "checkpoints" / f"step_{stop:08d}"
    assert (checkpoint / "manifest.json").is_file()

    # Resumed from that step; the metrics continue, each step once, to the shortened end.
    resumed = logs["node0-resumed"] + logs["node1-resumed"]
    assert re.search(rf"resumed from \S*checkpoints/step_{stop:08d} at step {stop}\b", resumed), resumed[-3000:]
    assert metrics_steps(run_dir) == list(range(1, stop + 4))
    assert "world 2 = dp 1 x ep 2" in first  # one rank per container, experts split across them

    # compose.yaml + compose.cpu.yaml: both nodes trained the 6 steps together.
    assert metrics_steps(tmp_path / "runs" / "compose-cpu") == list(range(1, 7))
    assert "world 2 = dp 1 x ep 2" in logs["node0_1"] + logs["node1_1"]
    print(f"podman check: {seconds:.0f} s; preempted at step {stop}\n" +
          "\n".join(line for line in proc.stderr.splitlines() if " podman_check: " in line))
