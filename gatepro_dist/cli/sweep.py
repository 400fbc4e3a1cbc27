"""`gatepro-sweep SWEEP.yaml`: run a grid of training configs and aggregate their metrics.

    gatepro-sweep configs/sweeps/gatepro_vs_baseline.yaml              # run locally, one after another
    gatepro-sweep configs/sweeps/gatepro_vs_baseline.yaml --dry-run    # print the commands only
    gatepro-sweep configs/sweeps/gatepro_vs_baseline.yaml --slurm      # submit a Slurm array job
    gatepro-sweep configs/sweeps/gatepro_vs_baseline.yaml --aggregate  # summary.csv + plots only
    gatepro-sweep configs/sweeps/ladder_init0.yaml --only 'mask_seed=*' --only 'baseline_seed=*'
                                                  # only the runs whose names match (shell patterns)

Runs that already reached their last step are skipped, so running the command again continues an
interrupted sweep; with ``archive:`` in the sweep file, finished runs are also kept in compact form
there (commit it) and count as finished on any machine.

A grid axis ``train.seed: [0, 1, 2]`` repeats every other combination with those seeds; the
aggregate then adds summary_over_seeds.csv/.md (mean ± std over seeds per combination).
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import shlex
import subprocess
import sys
from pathlib import Path

from ..config import ConfigError
from ..experiments.sweep import archive_run, is_complete, load_sweep, train_command
from ..experiments.sweep_report import aggregate


def slurm_array_script(sweep, commands: list[str], extra_sbatch: list[str]) -> str:
    cpus = max(run.world for run in sweep.runs)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={sweep.name}",
        f"#SBATCH --array=0-{len(commands) - 1}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --output={sweep.out_dir.resolve()}/slurm-%A_%a.out",
        *[f"#SBATCH {arg}" for arg in extra_sbatch],
        "# One array task per run; each line of commands.txt is one run (resume=auto: re-submitting continues).",
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        f'CMD=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str((sweep.out_dir / "commands.txt").resolve()))})',
        'echo "task $SLURM_ARRAY_TASK_ID: $CMD"',
        'eval "$CMD"',
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatepro-sweep", description=__doc__.splitlines()[0])
    parser.add_argument("sweep")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    mode.add_argument("--slurm", action="store_true", help="write and submit a Slurm array job")
    mode.add_argument("--aggregate", action="store_true", help="only aggregate finished runs")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="extra #SBATCH line, repeatable")
    parser.add_argument("--only", action="append", default=[], metavar="PATTERN",
                        help="run only the runs whose names match this shell pattern (repeatable; "
                             "the summary still holds every finished run)")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
    except ConfigError as err:
        print(f"gatepro-sweep: error: {err}", file=sys.stderr)
        return 2
    if args.only:
        chosen = tuple(run for run in sweep.runs if any(fnmatch.fnmatchcase(run.name, p) for p in args.only))
        if not chosen:
            print(f"gatepro-sweep: error: no run of {sweep.name} matches --only {' '.join(args.only)}; "
                  f"the runs are {', '.join(run.name for run in sweep.runs)}", file=sys.stderr)
            return 2
        full, sweep = sweep, dataclasses.replace(sweep, runs=chosen)
    else:
        full = sweep

    commands = [shlex.join(train_command(sweep, run, sys.executable)) for run in sweep.runs]
    if args.dry_run:
        print("\n".join(commands))
        return 0
    if args.slurm:
        sweep.out_dir.mkdir(parents=True, exist_ok=True)
        (sweep.out_dir / "commands.txt").write_text("\n".join(commands) + "\n")
        script = sweep.out_dir / "sweep_array.sbatch"
        script.write_text(slurm_array_script(sweep, commands, args.sbatch_arg))
        proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"gatepro-sweep: error: sbatch failed: {proc.stderr.strip()}", file=sys.stderr)
            return 1
        print(f"submitted array job {proc.stdout.strip()} ({len(commands)} runs); "
              f"aggregate afterwards with: gatepro-sweep {args.sweep} --aggregate")
        return 0
    if not args.aggregate:
        for i, (run, command) in enumerate(zip(sweep.runs, commands), 1):
            if is_complete(sweep, run):
                print(f"[{i}/{len(commands)}] {run.name}: already complete")
                archive_run(sweep, run)
                continue
            print(f"[{i}/{len(commands)}] {run.name}: {command}", flush=True)
            run_dir = run.run_dir(sweep.out_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "train.log", "a") as log:
                code = subprocess.run(train_command(sweep, run, sys.executable), stdout=log, stderr=subprocess.STDOUT).returncode
            if code != 0:
                print(f"gatepro-sweep: error: run {run.name} exited with {code}; see {run_dir / 'train.log'}",
                      file=sys.stderr)
                return 1
            archive_run(sweep, run)
    else:
        for run in full.runs:
            archive_run(full, run)
    path = aggregate(full)
    print(f"summary: {path}")
    over_seeds = path.with_name("summary_over_seeds.md")
    if over_seeds.is_file():
        print(f"mean ± std over seeds: {over_seeds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
