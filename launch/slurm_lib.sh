# Sourced by launch/slurm_torchrun.sbatch and launch/slurm_srun.sbatch: head node, preemption
# forwarding and requeue, in one place.
#
# How a preemption reaches the ranks (docs/launch.md has the whole story):
#   * `#SBATCH --signal=B:USR1@120` sends SIGUSR1 to this batch shell 120 s before the time limit.
#     The trap below forwards it as SIGUSR1 to srun, which passes it to every process of the step.
#     (SIGTERM to srun would make it SIGKILL the tasks, so we never forward TERM.)
#   * `scancel --signal=TERM|USR1 JOB` and Slurm's own preemption signal the step's processes
#     directly; torchrun forwards both to its workers (--signals-to-handle).
#   * The ranks agree on a step, checkpoint, exit 75, and rank 0 writes $GATEPRO_PREEMPTED_MARKER.
#   * Here: on a trapped signal, exit code 75, or the marker, `scontrol requeue` puts the job back
#     in the queue (needs --requeue); the next start resumes with train.resume=auto.

gatepro_fail() { echo "gatepro: error: $*" >&2; exit 2; }

# The first node of the allocation, as an address the other nodes can reach. No fallback to
# localhost: a wrong head node would make every other node wait until the rendezvous times out.
gatepro_head_node() {
    local head addr
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    [ -n "$head" ] || gatepro_fail "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host"
    addr=$(scontrol show node "$head" -o 2>/dev/null | grep -oP 'NodeAddr=\K\S+' || true)
    echo "${addr:-$head}"
}

gatepro_home() {
    local home=${GATEPRO_HOME:-$SLURM_SUBMIT_DIR}
    [ -f "$home/launch/slurm_lib.sh" ] || gatepro_fail "GATEPRO_HOME=$home is not a gatepro_dist checkout; submit from the repository root or export GATEPRO_HOME"
    echo "$home"
}

# gatepro_run_step SRUN_ARGS... : run the step in the background, forward preemption signals,
# wait for it, and requeue the job if the run was preempted. Returns the step's exit code.
gatepro_run_step() {
    export GATEPRO_PREEMPTED_MARKER=${GATEPRO_PREEMPTED_MARKER:-$SLURM_SUBMIT_DIR/.gatepro-preempted.$SLURM_JOB_ID}
    rm -f "$GATEPRO_PREEMPTED_MARKER"
    local signalled=0 rc=0 step_pid
    trap 'signalled=1; echo "gatepro: batch shell got SIGUSR1; asking the ranks to checkpoint" >&2; kill -USR1 "$step_pid" 2>/dev/null || true' USR1
    trap 'signalled=1; echo "gatepro: batch shell got SIGTERM; asking the ranks to checkpoint" >&2; kill -USR1 "$step_pid" 2>/dev/null || true' TERM
    srun "$@" &
    step_pid=$!
    while :; do
        wait "$step_pid" && rc=0 || rc=$?
        kill -0 "$step_pid" 2>/dev/null || break  # `wait` returned early because a trap ran
    done
    trap - USR1 TERM
    if [ "$signalled" = 1 ] || [ "$rc" = 75 ] || [ -e "$GATEPRO_PREEMPTED_MARKER" ]; then
        local restarts=${SLURM_RESTART_COUNT:-0}
        echo "gatepro: preempted (step exit $rc; $(cat "$GATEPRO_PREEMPTED_MARKER" 2>/dev/null || echo 'no marker')); restart count $restarts" >&2
        rm -f "$GATEPRO_PREEMPTED_MARKER"
        if [ "$restarts" -lt "${GATEPRO_MAX_REQUEUES:-20}" ]; then
            scontrol requeue "$SLURM_JOB_ID" && echo "gatepro: job $SLURM_JOB_ID requeued" >&2
            return 0
        fi
        echo "gatepro: GATEPRO_MAX_REQUEUES=${GATEPRO_MAX_REQUEUES:-20} reached; not requeueing" >&2
        return 75
    fi
    return "$rc"
}
