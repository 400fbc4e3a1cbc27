#!/usr/bin/env bash
# torchrun for gatepro-train (or gatepro-doctor), one node or many, c10d rendezvous.
#
#   launch/torchrun.sh CONFIG [key=value ...]                 # this machine, NPROC_PER_NODE ranks
#   launch/torchrun.sh doctor [--ep N]                        # preflight check instead of training
#   NNODES=2 MASTER_ADDR=node0 launch/torchrun.sh CONFIG ...  # run the same line on every node
#
# Environment (all optional on one node):
#   NNODES          nodes in the job (default 1)
#   NPROC_PER_NODE  ranks per node (default: visible GPUs, else 1)
#   MASTER_ADDR     rendezvous host: any node's reachable name or IP; required when NNODES > 1
#   MASTER_PORT     rendezvous port (default 29500)
#   RDZV_ID         job id shared by all nodes (default gatepro; use the scheduler's job id)
#   NODE_RANK       optional; 0 makes this node host the rendezvous store (is_host=1), any other
#                   value makes it a client (is_host=0); unset, c10d decides by address. c10d still
#                   assigns the node ranks of the workers itself.
#   LOCAL_ADDR      this node's address as the others see it (torchrun --local-addr); with
#                   NODE_RANK=0 it defaults to MASTER_ADDR. torchrun names each agent by this
#                   address (else the host name) and its PID, so two agents on one host with one
#                   host name and the same PID (PID 1 in two host-network containers) collide and
#                   never meet: give each a distinct LOCAL_ADDR (docs/launch.md, Docker)
#   RDZV_CONF       extra rendezvous settings, e.g. is_host=1 (torchrun --rdzv-conf)
#   SHUTDOWN_TIMEOUT seconds workers get to checkpoint after SIGTERM/SIGUSR1 (default 100)
#   TORCHRUN_ARGS   anything else for torchrun
#   GATEPRO_DRY_RUN=1  print the command instead of running it
#
# SIGTERM and SIGUSR1 reach torchrun and are forwarded to the workers, which agree on a step,
# checkpoint and exit 75 (see docs/launch.md); torchrun waits SHUTDOWN_TIMEOUT for them.
set -euo pipefail

entry=gatepro_dist.cli.train
case "${1:-}" in
    doctor) entry=gatepro_dist.cluster.doctor; shift ;;
    train) shift ;;
esac

nnodes=${NNODES:-1}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi

args=(--nnodes="$nnodes" --nproc-per-node="$NPROC_PER_NODE" --max-restarts=0
      --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
      --shutdown-timeout="${SHUTDOWN_TIMEOUT:-100}")
if [ "$nnodes" = 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    args+=(--standalone)  # a private c10d rendezvous on a free local port
else
    if [ -z "${MASTER_ADDR:-}" ]; then
        echo "torchrun.sh: error: NNODES=$nnodes needs MASTER_ADDR (the first node's name or IP)" >&2
        exit 2
    fi
    args+=(--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"
           --rdzv-id="${RDZV_ID:-gatepro}")
fi
# The store's host is reachable at MASTER_ADDR by definition: name that agent by it, so that it
# differs from every other agent's host-name-based name even on a shared host.
local_addr=${LOCAL_ADDR:-}
if [ -z "$local_addr" ] && [ "${NODE_RANK:-}" = 0 ] && [ "$nnodes" != 1 ]; then
    local_addr=${MASTER_ADDR:-}
fi
[ -z "$local_addr" ] || args+=(--local-addr="$local_addr")
rdzv_conf=${RDZV_CONF:-}
if [ -n "${NODE_RANK:-}" ] && [ "$nnodes" != 1 ] && [[ "$rdzv_conf" != *is_host=* ]]; then
    rdzv_conf="${rdzv_conf:+$rdzv_conf,}is_host=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)"
fi
[ -z "$rdzv_conf" ] || args+=(--rdzv-conf="$rdzv_conf")
# shellcheck disable=SC2206  # TORCHRUN_ARGS is a list of words on purpose
[ -z "${TORCHRUN_ARGS:-}" ] || args+=($TORCHRUN_ARGS)

cmd=("${PYTHON:-python3}" -m torch.distributed.run "${args[@]}" -m "$entry" "$@")
if [ "${GATEPRO_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
exec "${cmd[@]}"
