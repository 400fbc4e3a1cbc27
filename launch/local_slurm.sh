#!/usr/bin/env bash
# A throwaway single-node Slurm cluster (Debian slurm-wlm + munge) for trying the batch scripts
# on one machine, and for the launch tests. Needs root; starts no system services.
#
#   launch/local_slurm.sh install        # apt-get the Slurm daemons, client and munge (idempotent)
#   launch/local_slurm.sh up DIR         # write DIR/slurm.conf, start munged/slurmctld/slurmd
#   export SLURM_CONF=DIR/slurm.conf     # every client command (sbatch, squeue, ...) needs it
#   launch/local_slurm.sh down DIR       # stop what `up` started
#
# Ports: SLURMCTLD_PORT (default 6817) and SLURMD_PORT (default 6818); give parallel clusters
# their own ports and directories. CPUS (default: nproc) sets the node's CPU count. MIN_JOB_AGE
# (default 300 s) is how long a finished job stays visible; `sbatch --wait` polls after 2, 8, 32 s,
# growing the interval only while it is under MIN_JOB_AGE/2, so MIN_JOB_AGE=10 makes it poll faster.
set -euo pipefail
# The daemons and runuser live in the system directories, which a user's PATH (or `env -i`) may lack.
PATH="$PATH:/usr/sbin:/sbin"

die() { echo "local_slurm.sh: error: $*" >&2; exit 1; }

install_slurm() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null || die "apt-get is not available; install slurm-wlm and munge by hand"
    [ "$(id -u)" = 0 ] || die "installing Slurm needs root"
    # policy-rc.d keeps the packages' init scripts from starting daemons we did not ask for.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1; fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
    if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi
}

write_conf() {
    local dir=$1 host
    host=$(hostname -s)
    cat >"$dir/slurm.conf" <<EOF
ClusterName=gatepro-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
KillWait=10
MinJobAge=${MIN_JOB_AGE:-300}
NodeName=$host NodeAddr=127.0.0.1 CPUs=${CPUS:-$(nproc)} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

up() {
    local dir=${1:?usage: local_slurm.sh up DIR}
    mkdir -p "$dir"/{state,spool,log}
    dir=$(cd "$dir" && pwd)
    write_conf "$dir"
    export SLURM_CONF=$dir/slurm.conf
    if ! { [ -f /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; }; then
        install -d -o munge -g munge -m0755 /run/munge
        runuser -u munge -- /usr/sbin/munged
        touch "$dir/munged.ours"  # `down` stops only a munged that `up` started
    fi
    setsid slurmctld -D -f "$SLURM_CONF" >"$dir/log/ctld.out" 2>&1 </dev/null &
    echo $! >"$dir/ctld.launcher.pid"
    setsid slurmd -D -f "$SLURM_CONF" >"$dir/log/d.out" 2>&1 </dev/null &
    echo $! >"$dir/slurmd.launcher.pid"
    local deadline=$((SECONDS + 60))
    until [ "$(sinfo -h -o %T 2>/dev/null)" = idle ]; do
        [ $SECONDS -lt $deadline ] || die "the cluster did not become idle in 60 s; see $dir/log"
        sleep 0.2
    done
    echo "export SLURM_CONF=$SLURM_CONF"
}

down() {
    local dir=${1:?usage: local_slurm.sh down DIR}
    dir=$(cd "$dir" && pwd)
    export SLURM_CONF=$dir/slurm.conf
    # Cancel what still runs and let slurmd reap its step daemons before the daemons go away.
    scancel --quiet "--user=$(id -un)" 2>/dev/null || true
    local deadline=$((SECONDS + 30))
    while [ -n "$(squeue -h 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    scontrol shutdown >/dev/null 2>&1 || true
    local pid
    deadline=$((SECONDS + 20))
    for f in ctld.launcher.pid slurmd.launcher.pid; do
        [ -f "$dir/$f" ] || continue
        pid=$(cat "$dir/$f")
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/$f"
    done
    if [ -f "$dir/munged.ours" ] && [ -f /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f "$dir/munged.ours"
    fi
}

case "${1:-}" in
    install) install_slurm ;;
    up) shift; up "$@" ;;
    down) shift; down "$@" ;;
    *) echo "usage: $0 install | up DIR | down DIR" >&2; exit 2 ;;
esac
