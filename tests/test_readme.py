"""The README's main command, run as a newcomer runs it: from a fresh copy of the repository, in a fresh
virtual environment, with no GATEPRO_* (or PYTHON*) variables set, 2 processes and ep=2 as the README
promises; then run again, which resumes. The command is read from README.md so the two cannot drift.

The fresh venv sees this interpreter's installed packages through a .pth file (torch, numpy, ... are
not downloaded again); everything else — install.sh's checks, the editable install of the copy, the
launch — runs exactly as for the user. The copy holds what a clone holds: the files git tracks or would
track (`git ls-files --cached --others --exclude-standard`), so no build output or run directory of
this checkout leaks in.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHORTEN = ["train.steps=6", "train.eval_every=3", "train.save_every=3", "train.eval_batches=2"]


def readme_commands() -> list[str]:
    """The commands of the README's "Two commands" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)
            for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_readme_names_the_two_commands_and_ci_runs_the_second():
    main, tests = readme_commands()
    assert main == "bash launch/quickstart.sh"
    assert tests == "bash tests/run.sh"
    assert "exec bash tests/run.sh" in (ROOT / ".ci" / "run").read_text()


def fresh_copy(dest: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def fresh_venv(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    # pip itself, and every installed package, from this interpreter's site directories.
    purelib = subprocess.run([str(dest / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(p)]
    Path(purelib, "parent_site_packages.pth").write_text("\n".join(ours) + "\n")
    return dest


def newcomer_env(venv: Path) -> dict[str, str]:
    """The environment of a person who just activated a fresh venv: nothing of ours set."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GATEPRO_", "PYTHON", "VIRTUAL_ENV", "MASTER_", "WORLD_", "RANK", "LOCAL_",
                                "SLURM_", "OMPI_", "PMI", "NPROC"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


def run_main_command(clone: Path, env: dict, overrides: list[str]) -> subprocess.CompletedProcess:
    main = readme_commands()[0]
    return subprocess.run(main.split() + overrides, cwd=clone, env=env, capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_readme_main_command_trains_reports_and_resumes_on_a_fresh_machine(tmp_path):
    clone, venv = fresh_copy(tmp_path / "clone"), fresh_venv(tmp_path / "venv")
    env = newcomer_env(venv)

    first = run_main_command(clone, env, SHORTEN)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    run_dir = clone / "runs" / "quickstart"  # the README's promise, relative to where it was run
    assert "world=2 ep=2 dp=1" in first.stdout, first.stdout[-2000:]
    # The copy, not this checkout, is what the venv runs.
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import gatepro_dist; print(gatepro_dist.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(clone)), where

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(len(r["moe"]) == 4 and len(r["moe"][0]["tokens_per_expert"]) == 16 for r in records)
    report = (run_dir / "report.md").read_text()
    pngs = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert len(pngs) >= 4 and all((run_dir / p).stat().st_size > 1000 for p in pngs), pngs
    assert (run_dir / "config.yaml").is_file()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert int(latest.removeprefix("step_")) == 6 and (run_dir / "checkpoints" / latest / "manifest.json").is_file()

    # Running the command again continues the run (train.resume=auto in the quickstart config).
    longer = [o if not o.startswith("train.steps=") else "train.steps=9" for o in SHORTEN]
    second = run_main_command(clone, env, longer)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    assert "resumed from" in second.stdout and "at step 6" in second.stdout, second.stdout[-2000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))

    # And once more with nothing left to do: it reports instead of training again.
    third = run_main_command(clone, env, longer)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-5000:]
    assert "already finished its 9 steps" in third.stdout, third.stdout[-2000:]
