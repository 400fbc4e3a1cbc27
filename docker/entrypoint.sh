#!/usr/bin/env bash
# Container entrypoint: turns the container's environment into a launch (docs/launch.md, Docker).
#
#   IMAGE train CONFIG [key=value ...]   train (torchrun, one agent per container); more overrides
#                                        may come from GATEPRO_TRAIN_OVERRIDES
#   IMAGE doctor [--ep N]                preflight check of the allocation
#   IMAGE <anything else>                run it as is (bash, python, pytest, ...)
#
# Plain containers (docker run, compose): NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# NPROC_PER_NODE (default: the visible GPUs) become torchrun arguments (launch/torchrun.sh).
# Inside a Slurm job (srun --container-image=... with pyxis/enroot, or srun docker run -e SLURM_...):
#   one task per node   -> torchrun with NNODES=$SLURM_STEP_NUM_NODES, RDZV_ID=$SLURM_JOB_ID and
#                          MASTER_ADDR = the step's first host (scontrol, else the node list itself)
#   one task per rank   -> the Python entry point directly: it reads SLURM_PROCID & co. itself
# GATEPRO_DRY_RUN=1 prints the command instead of running it.
# Exit codes: those of torchrun, except 75 when the ranks were preempted and saved a checkpoint.
set -euo pipefail
home=${GATEPRO_HOME:-$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)}
[ -f "$home/launch/torchrun.sh" ] || home=/opt/gatepro

case "${1:-}" in
    train|doctor) verb=$1; shift ;;
    "") verb=doctor ;;
    *) exec "$@" ;;
esac
entry=gatepro_dist.cli.train
[ "$verb" = train ] || entry=gatepro_dist.cluster.doctor
# GATEPRO_TRAIN_OVERRIDES: key=value overrides appended to the train command, space-separated; a
# compose override file can set it (merging `command:` lists differs between compose tools).
if [ "$verb" = train ] && [ -n "${GATEPRO_TRAIN_OVERRIDES:-}" ]; then
    # shellcheck disable=SC2206  # a list of words on purpose
    set -- "$@" ${GATEPRO_TRAIN_OVERRIDES}
fi

if [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_STEP_NUM_TASKS:-}" ]; then
    nodes=${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}
    if [ "$SLURM_STEP_NUM_TASKS" -gt "$nodes" ]; then  # srun started every rank
        cmd=("${PYTHON:-python3}" -m "$entry" "$@")
        if [ "${GATEPRO_DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
        exec "${cmd[@]}"
    fi
    export NNODES=$nodes RDZV_ID=${RDZV_ID:-$SLURM_JOB_ID}
    export MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
    if [ -z "${MASTER_ADDR:-}" ]; then
        nodelist=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}
        MASTER_ADDR=$(scontrol show hostnames "$nodelist" 2>/dev/null | head -n1 || true)
        [ -n "$MASTER_ADDR" ] || MASTER_ADDR=$("${PYTHON:-python3}" -c 'import os
from gatepro_dist.cluster.topology import slurm_head_node
print(slurm_head_node(os.environ) or "")')  # no scontrol in the image: expand the list ourselves
        [ -n "$MASTER_ADDR" ] || { echo "entrypoint: error: cannot tell the first node of the Slurm step; export MASTER_ADDR" >&2; exit 2; }
        export MASTER_ADDR
    fi
    unset NODE_RANK  # c10d decides which agent hosts the store
fi
if [ "${GATEPRO_DRY_RUN:-0}" = 1 ] || [ "$verb" != train ]; then
    exec bash "$home/launch/torchrun.sh" "$verb" "$@"
fi
# Training: torchrun's agent exits 1 whenever its workers stop, preemption included, so the
# container's exit code could not tell "checkpointed, start me again" from a failure. Rank 0 writes
# GATEPRO_PREEMPTED_MARKER after the preemption checkpoint; it lies on the runs volume, which every
# node of the job mounts (resuming needs that anyway), so every container sees it and exits 75
# (EX_TEMPFAIL) like the ranks themselves. Without a runs folder only rank 0's container knows.
if [ -z "${GATEPRO_PREEMPTED_MARKER:-}" ]; then
    marker_dir=$home/runs
    [ -d "$marker_dir" ] && [ -w "$marker_dir" ] || marker_dir=${TMPDIR:-/tmp}
    export GATEPRO_PREEMPTED_MARKER=$marker_dir/.gatepro-preempted.${RDZV_ID:-gatepro}
fi
rm -f "$GATEPRO_PREEMPTED_MARKER"
bash "$home/launch/torchrun.sh" "$verb" "$@" &
agent=$!
# docker stop / compose stop send SIGTERM to this script (PID 1): pass it on to torchrun, which
# forwards it to the ranks; they agree on a step and checkpoint.
for sig in TERM INT HUP QUIT USR1; do
    # shellcheck disable=SC2064  # expand $agent and $sig now
    trap "kill -s $sig $agent 2>/dev/null || true" "$sig"
done
rc=0
while kill -0 "$agent" 2>/dev/null; do
    wait "$agent" && rc=0 || rc=$?  # a trapped signal interrupts wait; wait again for the exit
done
if [ -s "$GATEPRO_PREEMPTED_MARKER" ]; then
    echo "gatepro-entrypoint: preempted after step $(cut -d' ' -f1 "$GATEPRO_PREEMPTED_MARKER"); exiting with 75 (restart resumes with train.resume=auto)" >&2
    exit 75
fi
exit "$rc"
