#!/usr/bin/env bash
# Builds docker/Dockerfile with podman and runs the image for real, on a machine with no Docker
# engine, no GPU and no container registry (tests/test_docker.py runs it in CI):
#   1. images: a Debian base from debootstrap with a venv and CPU torch (the stand-in for the CUDA
#      BASE_IMAGE), then the project image from docker/Dockerfile, both built offline from a
#      wheel folder that pip fills on the host;
#   2. doctor: `gatepro-doctor --ep 2` in a container;
#   3. preemption: two containers as two nodes (host network, one rank each, ep=2 across them,
#      distinct LOCAL_ADDR) train the quickstart config until `podman stop` sends both SIGTERM,
#      as `docker compose stop` does; both must exit 75 with the checkpoint of the step they agreed
#      on, and two new containers must resume from it and finish;
#   4. compose: docker/compose.yaml + docker/compose.cpu.yaml under podman-compose train.
# Exit 0 when every check passed, else 1 with a last line `podman_check: FAILED: ...` (container
# logs above it); 2 on bad input. Containers it started are removed either way.
#
#   docker/podman_check.sh [WORK_DIR]   # run folders, logs, exit_codes.txt (default: a temp dir,
#                                       # removed when every check passed)
#
# Needs root on Debian or Ubuntu: apt-get installs podman, runc and debootstrap when they are
# missing, pip installs podman-compose into the cache. Environment (all optional):
#   GATEPRO_PODMAN_CACHE   kept between runs: wheels, containers.conf (default ~/.cache/gatepro_dist/podman);
#                          the images stay in podman's store, so a second run builds only what changed
#   GATEPRO_PODMAN_REBUILD=1  rebuild the Debian and base images even if they exist
#   DEBIAN_MIRROR          debootstrap's mirror (default: the first Debian mirror in apt's sources)
#   GATEPRO_TORCH_VERSION  torch in the base image (2.13.0)
#   GATEPRO_PODMAN_COMPOSE_VERSION  podman-compose from PyPI (1.6.0)
#   PYTHON                 host Python whose pip downloads the wheels (python3); its minor version
#                          must be the base image's (Debian bookworm: 3.11)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
torch_version=${GATEPRO_TORCH_VERSION:-2.13.0}
cache=${GATEPRO_PODMAN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gatepro_dist/podman}
suite=bookworm base_python=3.11
debian_image=localhost/gatepro-debian:$suite
base_image=localhost/gatepro-base-cpu:torch$torch_version
image=localhost/gatepro_dist:cpu
tag=gatepro-check-$$  # container and compose project names of this run

say() { printf '%s podman_check: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { echo "podman_check: FAILED: $*" >&2; exit 1; }
usage_error() { echo "podman_check: error: $*" >&2; exit 2; }
elapsed() { echo $((SECONDS - $1)); }

[ $# -le 1 ] || usage_error "takes at most one argument, WORK_DIR (got $#); e.g. docker/podman_check.sh /tmp/podman-check"
[ "$(id -u)" = 0 ] || usage_error "needs root (apt-get, debootstrap and rootful podman); run it with sudo"
host_python=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
    || usage_error "PYTHON=$PYTHON does not run; set PYTHON to a Python $base_python with pip"
[ "$host_python" = "$base_python" ] \
    || usage_error "the host Python is $host_python but the base image has Debian $suite's Python $base_python, and pip downloads wheels for the Python that runs it; set PYTHON to a python$base_python with pip"
own_work=0
if [ $# = 1 ]; then work=$1; mkdir -p "$work"; else work=$(mktemp -d /tmp/gatepro-podman-check.XXXXXX) own_work=1; fi
work=$(cd "$work" && pwd)
mkdir -p "$cache"
say "work dir $work, cache $cache"

# ---- tools ----------------------------------------------------------------------------------
t=$SECONDS
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them; install them with the system's package manager"
    say "installing ${missing[*]} with apt-get"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" uidmap; } >"$work/apt.log" 2>&1 \
        || { tail -20 "$work/apt.log" >&2; die "apt-get could not install ${missing[*]} (log $work/apt.log)"; }
fi
# podman-compose from PyPI, in a venv of its own: Debian 12's 1.0.3 ignores network_mode: host (it
# adds a bridge network too, which podman refuses), appends command lists instead of replacing
# them, and knows no `!reset`.
compose_version=${GATEPRO_PODMAN_COMPOSE_VERSION:-1.6.0}
podman_compose=$cache/podman-compose-$compose_version/bin/podman-compose
if [ ! -x "$podman_compose" ]; then
    say "installing podman-compose $compose_version with pip"
    rm -rf "$cache/podman-compose-$compose_version"
    { "$PYTHON" -m venv "$cache/podman-compose-$compose_version" \
      && "$cache/podman-compose-$compose_version/bin/python" -m pip install --quiet --disable-pip-version-check \
          "podman-compose==$compose_version"; } >"$work/pip-compose.log" 2>&1 \
        || { tail -20 "$work/pip-compose.log" >&2; die "pip could not install podman-compose==$compose_version (log $work/pip-compose.log)"; }
fi
say "tools ready ($(podman --version), podman-compose $compose_version, $(elapsed $t) s)"

# podman's settings for these machines, in a file of ours (nothing in /etc changes): runc, because
# crun refuses hybrid cgroups; explicit nofile/nproc limits that root without CAP_SYS_RESOURCE may
# set (podman's defaults exceed the hard limits: "setrlimit RLIMIT_NOFILE: Operation not permitted").
# (nproc equal to the hard limit was refused too, so both stay below it where they can.)
at_most() { if [ "$1" = unlimited ] || [ "$1" -gt "$2" ]; then echo "$2"; else echo "$1"; fi; }
nofile=$(at_most "$(ulimit -Hn)" 65536) nproc=$(at_most "$(ulimit -Hu)" 32768) memlock_kb=$(ulimit -Hl)
if [ "$memlock_kb" = unlimited ]; then memlock=-1; else memlock=$((memlock_kb * 1024)); fi
export CONTAINERS_CONF=$cache/containers.conf
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
EOF

# ---- wheels: everything pip installs in the images, downloaded here -------------------------
# The builds then install with --no-index from this folder: they reach no package index (and no
# TLS-intercepting proxy needs to be trusted inside them). torch is pinned, so the CPU wheel that
# pip's configuration already offers is the one taken, and every extra of pyproject.toml comes along.
t=$SECONDS
wheels=$cache/wheels
requirements=$("$PYTHON" - "$repo/pyproject.toml" <<'EOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]))
EOF
)
wanted=$(printf 'torch==%s\nsetuptools>=70.1\nwheel\n%s\n' "$torch_version" "$requirements")
if [ "$(cat "$wheels/.requirements" 2>/dev/null)" != "$wanted" ]; then
    say "downloading wheels into $wheels"
    rm -rf "$wheels.partial" && mkdir -p "$wheels.partial"
    echo "torch==$torch_version" >"$work/torch-pin.txt"
    # DeepSpeed is an sdist: pip reads its metadata by running its setup.py, which imports torch;
    # without build isolation and with DS_BUILD_OPS=0 that uses the host's torch, as install.sh does.
    # shellcheck disable=SC2046  # one requirement per line, none has spaces
    DS_BUILD_OPS=0 "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-build-isolation \
        -d "$wheels.partial" -c "$work/torch-pin.txt" $(echo "$wanted" | tr '\n' ' ') >"$work/pip-download.log" 2>&1 \
        || { tail -20 "$work/pip-download.log" >&2; die "pip download failed (log $work/pip-download.log); the host's pip must reach an index or a wheel folder with torch==$torch_version"; }
    echo "$wanted" >"$wheels.partial/.requirements"
    rm -rf "$wheels" && mv "$wheels.partial" "$wheels"
fi
ls "$wheels"/torch-"$torch_version"*.whl >/dev/null 2>&1 || die "no torch $torch_version wheel in $wheels (pip took another file); remove $wheels and look at the host's pip configuration"
say "wheels ready: $(ls "$wheels" | wc -l) files, $(du -sh "$wheels" | cut -f1) ($(elapsed $t) s)"

# ---- images -----------------------------------------------------------------------------------
debian_mirror() {  # the first Debian archive apt uses here (one-line and deb822 formats)
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        sed -nE 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p; s/^URIs:[[:space:]]*//p' "$f" | tr ' ' '\n'
    done | grep -m1 -E '/debian/?$' || true
}
if [ "${GATEPRO_PODMAN_REBUILD:-0}" = 1 ]; then podman rmi -f "$image" "$base_image" "$debian_image" >/dev/null 2>&1 || true; fi
if ! podman image exists "$debian_image"; then
    t=$SECONDS
    mirror=${DEBIAN_MIRROR:-$(debian_mirror)}
    [ -n "$mirror" ] || usage_error "no Debian mirror in apt's sources (/etc/apt/sources.list*); set DEBIAN_MIRROR=<a Debian archive URL>"
    rootfs=$cache/rootfs
    rm -rf "$rootfs"
    say "debootstrap $suite from $mirror (about a minute)"
    # g++ and iproute2 are what the Dockerfile installs (the CUDA devel images have g++ already);
    # having them here leaves its apt-get step little to do.
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates,g++,iproute2 \
        "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (log $work/debootstrap.log); set DEBIAN_MIRROR to a reachable Debian archive"; }
    tar -C "$rootfs" -c . | podman import - "$debian_image" >"$work/import.log" 2>&1 \
        || { tail -20 "$work/import.log" >&2; die "podman import of the Debian root failed (log $work/import.log)"; }
    rm -rf "$rootfs"
    say "Debian image $debian_image ($(elapsed $t) s)"
fi
build() {  # build LOG ARGS...: podman build offline, the wheels mounted at /wheels
    local log=$1; shift
    podman build --network host -v "$wheels:/wheels:ro" "$@" >"$log" 2>&1 \
        || { tail -30 "$log" >&2; die "podman build failed (log $log)"; }
}
if ! podman image exists "$base_image"; then
    t=$SECONDS
    build "$work/build-base.log" --build-arg DEBIAN_IMAGE="$debian_image" --build-arg TORCH_VERSION="$torch_version" \
        -f "$repo/docker/base-cpu.Containerfile" -t "$base_image" "$repo/docker"
    say "base image $base_image ($(elapsed $t) s)"
fi
t=$SECONDS
previous=$(podman image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
# The Dockerfile as a cluster builds it; only BASE_IMAGE and the offline pip options differ.
build "$work/build.log" --build-arg BASE_IMAGE="$base_image" \
    --build-arg PIP_INSTALL_OPTIONS="--no-index --find-links /wheels" -f "$repo/docker/Dockerfile" -t "$image" "$repo"
if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect -f '{{.Id}}' "$image")" ]; then
    podman rmi "$previous" >/dev/null 2>&1 || true  # the image it replaced (its layers in common stay)
fi
say "project image $image ($(elapsed $t) s)"

# ---- containers -------------------------------------------------------------------------------
started=()
compose_up=0
compose() {
    "$podman_compose" -p "$tag" -f "$repo/docker/compose.yaml" -f "$repo/docker/compose.cpu.yaml" \
        -f "$work/compose.limits.yaml" "$@"
}
cleanup() {
    if [ "$compose_up" = 1 ]; then compose down -t 5 >/dev/null 2>&1 || true; fi
    [ ${#started[@]} = 0 ] || podman rm -f -t 5 "${started[@]}" >/dev/null 2>&1 || true
}
trap cleanup EXIT
exit_code() { podman inspect -f '{{.State.ExitCode}}' "$1"; }
state() { podman inspect -f '{{.State.Status}}' "$1" 2>/dev/null || echo missing; }
show_logs() { local c; for c in "$@"; do echo "----- podman logs $c (last 60 lines)" >&2; podman logs "$c" 2>&1 | tail -60 >&2 || true; done; }
fail_with_logs() { local why=$1; shift; show_logs "$@"; die "$why"; }
save_logs() { local c; for c in "$@"; do podman logs "$c" >"$work/$c.log" 2>&1 || true; done; }
wait_exited() {  # wait_exited SECONDS NAME...: until every container has exited
    local limit=$1 c; shift
    local deadline=$((SECONDS + limit))
    for c in "$@"; do
        while [ "$(state "$c")" != exited ]; do
            [ $SECONDS -lt $deadline ] || fail_with_logs "$c still $(state "$c") after ${limit} s" "$@"
            sleep 1
        done
    done
}
expect_exit() {  # expect_exit CODE NAME...: `podman wait` says 0 even for a container that never started
    local want=$1 c; shift
    for c in "$@"; do
        local got; got=$(exit_code "$c")
        echo "$c $got" >>"$work/exit_codes.txt"
        [ "$got" = "$want" ] || fail_with_logs "container $c exited with $got, expected $want" "$@"
    done
}
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
steps_done() { [ -f "$1/metrics.jsonl" ] && wc -l <"$1/metrics.jsonl" || echo 0; }

# doctor: preflight of a 2-rank, ep=2 allocation inside one container
t=$SECONDS
doctor=$tag-doctor
started+=("$doctor")
podman run -d --name "$doctor" --network host --ipc host -e NPROC_PER_NODE=2 -e OMP_NUM_THREADS=1 \
    "$image" doctor --ep 2 >/dev/null || die "podman run $doctor failed"
wait_exited 180 "$doctor"
save_logs "$doctor"
expect_exit 0 "$doctor"
grep -Eq 'all_to_all_round_trip .* ok' "$work/$doctor.log" || fail_with_logs "doctor printed no passing all_to_all_round_trip line" "$doctor"
grep -Eq 'all_gather .* ok' "$work/$doctor.log" || fail_with_logs "doctor printed no passing all_gather line" "$doctor"
say "doctor passed ($(elapsed $t) s)"

# two nodes, then SIGTERM to both, then a restart that resumes
runs=$work/runs run_dir=$work/runs/two-nodes
mkdir -p "$runs"
port=$(free_port)
two_nodes() {  # two_nodes SUFFIX TRAIN_ARGS...: node0 and node1 as `docker run` would start them
    local suffix=$1 rank; shift
    for rank in 0 1; do
        local name=$tag-node$rank$suffix
        started+=("$name")
        # 127.0.0.x: both containers have the host's network and name; distinct LOCAL_ADDRs give
        # their torchrun agents distinct rendezvous identities (both are children of PID 1).
        podman run -d --name "$name" --network host --ipc host -v "$runs:/opt/gatepro/runs" \
            -e NNODES=2 -e NODE_RANK=$rank -e NPROC_PER_NODE=1 -e MASTER_ADDR=127.0.0.1 -e MASTER_PORT="$port" \
            -e LOCAL_ADDR=127.0.0.$((rank + 1)) -e RDZV_ID="$tag$suffix" -e OMP_NUM_THREADS=1 -e SHUTDOWN_TIMEOUT=60 \
            "$image" train configs/quickstart.yaml train.run_dir=runs/two-nodes train.eval_every=1000 \
            train.save_every=1000 "$@" >/dev/null || die "podman run $name failed"
    done
}
t=$SECONDS
two_nodes "" train.steps=1000  # long: the signal always lands mid-run, however slow the machine
nodes=("$tag-node0" "$tag-node1")
deadline=$((SECONDS + 300))
until [ "$(steps_done "$run_dir")" -ge 3 ]; do
    for c in "${nodes[@]}"; do
        [ "$(state "$c")" = running ] || fail_with_logs "$c stopped before training 3 steps (state $(state "$c"))" "${nodes[@]}"
    done
    [ $SECONDS -lt $deadline ] || fail_with_logs "the two nodes trained no 3 steps within 300 s (rendezvous?)" "${nodes[@]}"
    sleep 0.5
done
say "two nodes training; podman stop (SIGTERM to both)"
podman stop -t 90 "${nodes[@]}" >/dev/null || true
wait_exited 120 "${nodes[@]}"
save_logs "${nodes[@]}"
expect_exit 75 "${nodes[@]}"
stop_step=$(sed -nE 's/.*preempted by SIGTERM after step ([0-9]+).*/\1/p' "$work/$tag-node0.log" "$work/$tag-node1.log" | head -n1)
[ -n "$stop_step" ] || fail_with_logs "no 'preempted by SIGTERM after step N' line from rank 0" "${nodes[@]}"
checkpoint=$(printf '%s/checkpoints/step_%08d' "$run_dir" "$stop_step")
[ -f "$checkpoint/manifest.json" ] || fail_with_logs "no preemption checkpoint $checkpoint/manifest.json" "${nodes[@]}"
[ "$(steps_done "$run_dir")" = "$stop_step" ] || die "metrics.jsonl has $(steps_done "$run_dir") steps, the checkpoint is of step $stop_step"
say "both nodes exited 75, checkpoint of step $stop_step ($(elapsed $t) s)"

t=$SECONDS
final=$((stop_step + 3))  # users may shorten train.steps on resume: end soon (a cosine schedule
two_nodes -resumed "train.steps=$final" train.allow_schedule_change=true  # then needs the consent)
nodes=("$tag-node0-resumed" "$tag-node1-resumed")
wait_exited 300 "${nodes[@]}"
save_logs "${nodes[@]}"
expect_exit 0 "${nodes[@]}"
resumed=$(printf 'resumed from [^ ]*two-nodes/checkpoints/step_%08d at step %d' "$stop_step" "$stop_step")
cat "$work/$tag-node0-resumed.log" "$work/$tag-node1-resumed.log" | grep -q "$resumed" \
    || fail_with_logs "the restart did not say 'resumed from .../step_$(printf %08d "$stop_step") at step $stop_step'" "${nodes[@]}"
[ "$(steps_done "$run_dir")" = "$final" ] || die "metrics.jsonl has $(steps_done "$run_dir") lines after the resumed run, expected $final (each step once)"
say "restart resumed at step $stop_step and finished step $final ($(elapsed $t) s)"

# docker/compose.yaml with the CPU override, under podman-compose
t=$SECONDS
MASTER_PORT=$(free_port)
export MASTER_ADDR=127.0.0.1 MASTER_PORT RDZV_ID=$tag-compose RUNS_DIR=$runs GATEPRO_IMAGE=$image \
    GATEPRO_STEPS=6 GATEPRO_RUN_NAME=compose-cpu
limits="    ulimits: {memlock: $memlock, nofile: $nofile, nproc: $nproc}"  # this host's, as containers.conf
printf 'services:\n  node0:\n%s\n  node1:\n%s\n' "$limits" "$limits" >"$work/compose.limits.yaml"
unset LOCAL_ADDR  # node1 keeps its host name, node0 is named by MASTER_ADDR: the default must suffice
compose_up=1
compose up -d --no-build >"$work/compose-up.log" 2>&1 || { cat "$work/compose-up.log" >&2; die "podman-compose up failed"; }
nodes=("${tag}_node0_1" "${tag}_node1_1")
for c in "${nodes[@]}"; do podman container exists "$c" || { cat "$work/compose-up.log" >&2; die "podman-compose did not create $c"; }; done
wait_exited 300 "${nodes[@]}"
save_logs "${nodes[@]}"
expect_exit 0 "${nodes[@]}"
[ "$(steps_done "$runs/compose-cpu")" = 6 ] || fail_with_logs "compose run wrote $(steps_done "$runs/compose-cpu") metrics lines, expected 6" "${nodes[@]}"
grep -q "world 2 = dp 1 x ep 2" "$work/${tag}_node0_1.log" "$work/${tag}_node1_1.log" \
    || fail_with_logs "the compose run's rank map does not show ep=2 across the two containers" "${nodes[@]}"
say "compose (compose.yaml + compose.cpu.yaml) trained 6 steps ($(elapsed $t) s)"
[ "$own_work" = 0 ] || rm -rf "$work"  # kept when it failed, or when the caller named it
echo "podman_check: PASSED (doctor; two nodes preempted at step $stop_step, exit 75, resumed to step $final; compose trained 6 steps)"
