#!/usr/bin/env bash
# Container entrypoint: turns the container's environment into a launch (docs/launch.md, Docker).
#
#   IMAGE train CONFIG [key=value ...]   train (torchrun, one agent per container)
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
exec bash "$home/launch/torchrun.sh" "$verb" "$@"
