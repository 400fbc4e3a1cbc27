"""Checkpoints are checked before they are trusted: every file's size and SHA-256 is in the
manifest; a damaged file is named, `resume=auto` falls back to the newest intact checkpoint, and a
save that runs out of disk fails clearly and leaves the previous checkpoint as it was.

Real files, real DCP checkpoints, real gloo groups; the full disk is a real (small) tmpfs mounted
in a private mount namespace made for the test.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import run_on_ranks
from gatepro_dist.train.checkpoint import CheckpointError, find_damage, latest_checkpoint, resolve_resume
from gatepro_dist.train.parallel import single_process_groups
from launch_helpers import REPO, clean_env, losses, train_args
from test_trainer import assert_close_lists, run_training

SAVE = ["train.save_every=2"]


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("*.distcp"))[-1]


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[float]:
    return run_training(1, tmp_path_factory.mktemp("ref") / "run", "train.steps=8", *SAVE)


def test_the_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
    run = tmp_path / "run"
    run_training(1, run, "train.steps=2", *SAVE)
    ckpt = checkpoint(run, 2)
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    on_disk = sorted(p.name for p in ckpt.iterdir() if p.name != "manifest.json")
    assert sorted(files) == on_disk and "trainer_state.json" in files and ".metadata" in files
    for name, entry in files.items():
        data = (ckpt / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert find_damage(ckpt, single_process_groups()) is None


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "missing"])
def test_a_damaged_file_is_named_and_an_explicit_resume_refuses_it(tmp_path, damage):
    run = tmp_path / "run"
    run_training(1, run, "train.steps=2", *SAVE)
    ckpt = checkpoint(run, 2)
    victim = shard(ckpt)
    size = victim.stat().st_size
    if damage == "flipped byte":
        flip_byte(victim)
        why = "does not match its SHA-256 in the manifest (corrupted)"
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[: size // 3])
        why = f"has {size // 3} bytes, the manifest says {size} (truncated?)"
    else:
        victim.unlink()
        why = "is missing"
    assert find_damage(ckpt, single_process_groups()) == f"{victim} {why}"
    with pytest.raises(CheckpointError) as err:
        run_training(1, tmp_path / "next", "train.steps=4", f"train.resume={ckpt}")
    assert str(err.value).startswith(f"{victim} {why}; resume from another checkpoint")
    assert not (tmp_path / "next").exists(), "a refused checkpoint must not start a run directory"


def test_resume_auto_falls_back_to_the_previous_intact_checkpoint(tmp_path, uninterrupted):
    run = tmp_path / "run"
    run_training(1, run, "train.steps=6", *SAVE)
    flip_byte(shard(checkpoint(run, 6)))
    (checkpoint(run, 4) / "trainer_state.json").write_text('{"step": 4, "sampler": {}}  ')  # damaged too
    said = []
    groups = single_process_groups()
    assert resolve_resume(run, "auto", groups, log=said.append) == checkpoint(run, 2)
    assert len(said) == 2 and "step_00000006" in said[0] and "step_00000004" in said[1]
    assert all("falling back to the previous complete checkpoint" in line for line in said)

    resumed = run_training(1, run, "train.steps=8", *SAVE, "train.resume=auto")
    assert len(resumed) == 6  # steps 3..8 run again from the step-2 checkpoint
    assert_close_lists(losses(run), uninterrupted, rel=0)  # metrics.jsonl: steps 1..8, as uninterrupted
    assert latest_checkpoint(run) == checkpoint(run, 8)


def test_when_every_checkpoint_is_damaged_resume_auto_stops_with_a_clear_error(tmp_path):
    run = tmp_path / "run"
    run_training(1, run, "train.steps=4", *SAVE)
    for step in (2, 4):
        flip_byte(shard(checkpoint(run, step)))
    with pytest.raises(CheckpointError, match=r"every checkpoint in .* is damaged \(step_00000004, step_00000002\)"):
        resolve_resume(run, "auto", single_process_groups(), log=lambda *_: None)


def _resolve_on_ranks(rank, world, run):
    from gatepro_dist.train.parallel import build_parallel_groups

    said = []
    chosen = resolve_resume(run, "auto", build_parallel_groups(2), log=said.append)
    return str(chosen), said


def test_ranks_share_the_hashing_and_agree_on_the_fallback(tmp_path):
    """At ep=2 each rank hashes half of the files (rank 1 gets rank 0's shard); the damage rank 1
    finds reaches rank 0, which reports it, and both ranks choose the same checkpoint."""
    run = tmp_path / "run"
    run_training(2, run, "train.steps=4", *SAVE, "parallel.ep=2")
    victim = sorted(checkpoint(run, 4).glob("__0_*.distcp"))[0]
    flip_byte(victim, offset=100)
    results = run_on_ranks(2, _resolve_on_ranks, str(run))
    assert [r[0] for r in results] == [str(checkpoint(run, 2))] * 2
    assert results[0][1] == [f"checkpoint damaged: {victim} does not match its SHA-256 in the manifest "
                             "(corrupted); falling back to the previous complete checkpoint"]
    assert results[1][1] == []  # rank 0 reports


FULL_DISK_SCRIPT = """
set -u
mount -t tmpfs -o size={size} tmpfs "{mnt}" || exit 97
for rank in 0 1; do
    RANK=$rank LOCAL_RANK=$rank WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT={port} \\
        "{python}" -m gatepro_dist.cli.train {args} 2> "{out}/stderr.$rank" > "{out}/stdout.$rank" &
done
codes=""
for job in $(jobs -p); do wait $job; codes="$codes $?"; done
echo $codes > "{out}/codes"
df -k "{mnt}" | tail -1 > "{out}/df"
cp -a "{mnt}/run" "{out}/run"
"""


@pytest.mark.slow
def test_a_full_disk_during_a_save_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare to mount a small tmpfs in a private mount namespace")
    # The run on a roomy disk: how much one checkpoint takes, and the losses to continue to.
    reference_dir = tmp_path / "reference"
    reference = run_training(2, reference_dir, "train.steps=6", *SAVE, "parallel.ep=2")
    one = sum(p.stat().st_size for p in checkpoint(reference_dir, 2).iterdir())
    size_kb = (one * 3 // 2 + 256 * 1024) // 1024  # room for one checkpoint and the logs, not two

    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    from test_launch_faults import free_port

    args = " ".join(f"'{a}'" for a in train_args(mnt / "run", "train.save_every=2", steps=6))
    script = FULL_DISK_SCRIPT.format(size=f"{size_kb}k", mnt=mnt, out=out, port=free_port(),
                                     python=sys.executable, args=args)
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare.insert(1, "--map-root-user")
    proc = subprocess.run([*unshare, "bash", "-c", script], env=clean_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 97 or (proc.returncode != 0 and "unshare" in proc.stderr):
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr

    codes = (out / "codes").read_text().split()
    errors = [(out / f"stderr.{r}").read_text() for r in (0, 1)]
    assert codes == ["1", "1"], errors
    run = out / "run"
    lines = [line for line in errors[0].splitlines() if line.startswith("gatepro-train: error:")]
    ckpts = f"{mnt}/run/checkpoints"
    expected = (re.escape(f"gatepro-train: error: saving checkpoint {ckpts}/step_00000004 failed: No space "
                          "left on device (") + r"[^;]+" +  # the file, or the bytes left on the filesystem
                re.escape(f"); the previous checkpoint {ckpts}/step_00000002 is intact; free space or fix "
                          f"{ckpts}, then rerun with train.resume=auto"))
    assert len(lines) == 1 and re.fullmatch(expected, lines[0]), errors[0]
    assert "Traceback" not in errors[0] + errors[1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert latest_checkpoint(run) == checkpoint(run, 2)
    assert find_damage(checkpoint(run, 2), single_process_groups()) is None

    # The kept checkpoint is the real thing: resuming it (on a roomy disk) continues exactly.
    run_training(2, run, "train.steps=6", *SAVE, "parallel.ep=2", "train.resume=auto")
    assert_close_lists(losses(run), reference, rel=1e-6)
