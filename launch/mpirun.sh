#!/usr/bin/env bash
# mpirun for gatepro-train (or gatepro-doctor): one MPI rank per training rank.
#
#   NP=2 launch/mpirun.sh CONFIG [key=value ...]
#   NP=16 HOSTFILE=hosts.txt launch/mpirun.sh CONFIG ...     # hosts.txt: "node0 slots=8" per line
#   NP=2 launch/mpirun.sh doctor --ep 2
#
# Ranks come from OMPI_COMM_WORLD_* (Open MPI) or PMI_RANK/MPI_LOCALRANKID (MPICH, Intel MPI);
# without MASTER_ADDR, rank 0 broadcasts its address and a free port with mpi4py
# (pip install 'gatepro_dist[mpi]', which also brings the Open MPI wheel with its mpirun).
#
# Environment: NP (ranks, default 2), HOSTFILE, MPIRUN (default mpirun), MPIRUN_ARGS (extra
# arguments), GATEPRO_DRY_RUN=1 (print the command). Preemption: send SIGUSR1 to mpirun, which
# forwards it to every rank (SIGTERM makes Open MPI kill the ranks before they can checkpoint).
set -euo pipefail

entry=gatepro_dist.cli.train
case "${1:-}" in
    doctor) entry=gatepro_dist.cluster.doctor; shift ;;
    train) shift ;;
esac

mpirun=${MPIRUN:-mpirun}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # as torchrun does: N ranks x all cores oversubscribes
args=(-n "${NP:-2}")
[ -z "${HOSTFILE:-}" ] || args+=(--hostfile "$HOSTFILE")
if "$mpirun" --version 2>/dev/null | grep -q "Open MPI"; then
    # Don't pin each rank to one core (torch runs its own threads); allow more ranks than cores
    # (CPU tests); pass the variables the ranks need to remote nodes.
    args+=(--bind-to none --oversubscribe)
    for var in PATH LD_LIBRARY_PATH PYTHONPATH MASTER_ADDR MASTER_PORT OMP_NUM_THREADS \
               $(compgen -e | grep -E '^(NCCL|GLOO|TORCH|CUDA)_' || true); do
        [ -z "${!var:-}" ] || args+=(-x "$var")
    done
    if [ "$(id -u)" = 0 ]; then
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    fi
fi
# shellcheck disable=SC2206  # MPIRUN_ARGS is a list of words on purpose
[ -z "${MPIRUN_ARGS:-}" ] || args+=($MPIRUN_ARGS)

cmd=("$mpirun" "${args[@]}" "${PYTHON:-python3}" -m "$entry" "$@")
if [ "${GATEPRO_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
exec "${cmd[@]}"
