"""gatepro-doctor: a real 2-process torchrun preflight with measured bandwidth, and the diagnosis
rules as pure functions of a report."""
from __future__ import annotations

import json

import pytest

from gatepro_dist.cluster.doctor import diagnose
from launch_helpers import clean_env, run


@pytest.mark.slow
def test_doctor_under_torchrun_checks_the_collectives_and_reports_bandwidth(tmp_path):
    out = tmp_path / "doctor.json"
    proc = run(["bash", "launch/torchrun.sh", "doctor", "--size-mb", "2", "--iters", "3", "--json", str(out)],
               clean_env(NPROC_PER_NODE="2"), timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report["source"], report["backend"], report["world_size"], report["ep"]) == ("torchrun", "gloo", 2, 2)
    assert report["ep_groups"] == [[0, 1]] and len(report["ranks"]) == 2
    for name in ("all_to_all_round_trip", "all_gather"):
        measured = report["collectives"][name]
        assert measured["ok"] and measured["seconds"] > 0 and measured["busbw_GBps"] > 0
        assert f"{name}" in proc.stdout and "GB/s" in proc.stdout
    assert report["ranks"][0]["shm_total"] > 0 and "OMP_NUM_THREADS" in report["ranks"][0]["env"]
    assert "diagnosis:" in proc.stdout and "[fail]" not in proc.stdout
    print(f"doctor measured all-to-all busbw {report['collectives']['all_to_all_round_trip']['busbw_GBps']:.3f} "
          f"GB/s, all-gather busbw {report['collectives']['all_gather']['busbw_GBps']:.3f} GB/s")


def rank(host="n0", torch="2.13.0", shm=8 << 30, env=None, cuda=0):
    return {"host": host, "local_rank": 0, "torch": torch, "device": "cpu", "cuda_devices": cuda, "cpus": 8,
            "shm_total": shm, "shm_free": shm, "env": env or {}, "ep_group": 0}


def report(ranks, backend="gloo", ok=True):
    measured = {"ok": ok, "bytes_per_rank": 1, "seconds": 1.0, "algbw_GBps": 2.0, "busbw_GBps": 1.0}
    return {"ranks": ranks, "backend": backend, "world_size": len(ranks), "ep": len(ranks),
            "ep_groups": [list(range(len(ranks)))],
            "collectives": {"all_to_all_round_trip": measured, "all_gather": dict(measured)}}


def levels(findings, word):
    return [level for level, text in findings if word in text]


def test_a_healthy_job_has_no_warnings():
    findings = diagnose(report([rank(), rank()]))
    assert {level for level, _ in findings} == {"ok"}


def test_docker_sized_dev_shm_is_a_warning_with_the_fix():
    findings = diagnose(report([rank(shm=64 << 20)]))
    assert levels(findings, "/dev/shm is only 64 MiB") == ["warn"]
    assert any("--ipc=host" in text for _, text in findings)


def test_wrong_data_and_mixed_torch_versions_fail():
    assert levels(diagnose(report([rank(), rank()], ok=False)), "wrong data") == ["fail", "fail"]
    assert levels(diagnose(report([rank(torch="2.13.0"), rank(torch="2.11.0")])), "torch versions") == ["fail"]


def test_multi_host_gloo_without_socket_ifname_and_disagreeing_nccl_settings_warn():
    findings = diagnose(report([rank("a", env={"NCCL_IB_HCA": "mlx5_0"}), rank("b", env={"NCCL_IB_HCA": "mlx5_1"})]))
    assert levels(findings, "GLOO_SOCKET_IFNAME is not set") == ["warn"]
    assert levels(findings, "disagree on NCCL_IB_HCA") == ["warn"]


def test_more_ranks_than_gpus_on_a_host_fails():
    findings = diagnose(report([rank(cuda=1), rank(cuda=1)], backend="nccl"))
    assert levels(findings, "sees 1 GPU") == ["fail"]
