#!/usr/bin/env bash
# Installs the project and its test tools into the current Python environment.
# torch is installed first and pinned: any looser request resolves to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
GATEPRO_SYSTEM_PACKAGES="${GATEPRO_SYSTEM_PACKAGES:-}"
# GATEPRO_WITH: optional integrations, space- or comma-separated: deepspeed megatron hf.
# The quickstart needs none of them; tests/run.sh asks for all. Unset means none (set -u).
GATEPRO_WITH="${GATEPRO_WITH:-}"
GATEPRO_WITH=" ${GATEPRO_WITH//,/ } "
wants() { [[ "$GATEPRO_WITH" == *" $1 "* ]]; }
PIP="${PYTHON:-python3} -m pip"
TORCH_VERSION="${GATEPRO_TORCH_VERSION:-2.13.0}"
# (Versions are read from package metadata, not by importing: importing torch alone takes seconds.)
if ! ${PYTHON:-python3} -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    $PIP install --quiet "torch==$TORCH_VERSION"
fi
# DeepSpeed and Megatron-core, for train.backend=deepspeed and gatepro_dist/integrations (their tests
# run in CI). Both come after torch and never re-resolve it. DeepSpeed ships as an sdist: build it
# against the torch above (--no-build-isolation: an isolated build env would pull a CUDA torch) and
# without its CUDA ops (DS_BUILD_OPS=0; its CPU shm op is JIT-compiled with g++ on first use).
# megatron-core needs only torch, numpy and packaging, so --no-deps keeps pip away from torch.
DEEPSPEED_VERSION="${GATEPRO_DEEPSPEED_VERSION:-0.19.8}"
if wants deepspeed && ! ${PYTHON:-python3} -c "import importlib.metadata as m, sys; sys.exit(m.version('deepspeed') != '$DEEPSPEED_VERSION')" 2>/dev/null; then
    # Building without isolation needs bdist_wheel here: in setuptools since 70.1, or the wheel package.
    ${PYTHON:-python3} -c "import setuptools.command.bdist_wheel" 2>/dev/null || ${PYTHON:-python3} -c "import wheel" 2>/dev/null \
        || $PIP install --quiet --disable-pip-version-check "setuptools>=70.1"
    DS_BUILD_OPS=0 $PIP install --quiet --disable-pip-version-check --no-build-isolation "deepspeed==$DEEPSPEED_VERSION"
fi
# Without CUDA, DeepSpeed compiles that shm op when its first process group starts: over two silent
# minutes on 2 cores. Build it now with DeepSpeed's own function (cached in torch's extension folder,
# so later starts load it in a second; on a CUDA machine there is nothing to build).
if wants deepspeed; then
    ${PYTHON:-python3} -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 \
        || echo "install.sh: warning: DeepSpeed's CPU shm op did not build (is g++ installed?); its first run will try again" >&2
fi
# megatron-core >= 0.17 needs Python >= 3.12; 0.16.1 is the newest for Python 3.11.
MEGATRON_SPEC="${GATEPRO_MEGATRON_SPEC:-$(${PYTHON:-python3} -c "import sys; print('megatron-core==0.16.1' if sys.version_info < (3, 12) else 'megatron-core>=0.17,<0.18')")}"
if wants megatron && ! ${PYTHON:-python3} -c "import importlib.metadata as m, sys; from packaging.requirements import Requirement as R; r = R('$MEGATRON_SPEC'); sys.exit(not r.specifier.contains(m.version(r.name)))" 2>/dev/null; then
    $PIP install --quiet --disable-pip-version-check --no-deps "$MEGATRON_SPEC"
fi
# GATEPRO_EXTRAS: more extras, comma-separated (e.g. GATEPRO_EXTRAS=mpi for mpi4py + the Open MPI wheel).
# Skipped when this checkout is already installed with them (launch/installed.py reads the metadata).
if ! ${PYTHON:-python3} launch/installed.py "test${GATEPRO_EXTRAS:+,$GATEPRO_EXTRAS}" 2>/dev/null; then
    $PIP install --quiet --disable-pip-version-check -e ".[test${GATEPRO_EXTRAS:+,$GATEPRO_EXTRAS}]"
fi
# GATEPRO_SYSTEM_PACKAGES: system software for the launch tests, space- or comma-separated.
#   slurm: Debian slurm-wlm daemons + client + munge via apt (launch/local_slurm.sh install; root).
#   podman: podman, runc and debootstrap via apt (root), for docker/podman_check.sh (tests/test_docker.py).
for pkg in ${GATEPRO_SYSTEM_PACKAGES//,/ }; do
    case "$pkg" in
        slurm) bash launch/local_slurm.sh install \
                   || echo "install.sh: warning: Slurm not installed; tests/test_slurm.py will try again" >&2 ;;
        podman) command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null \
                   || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                            --no-install-recommends podman runc debootstrap uidmap >/dev/null; } \
                   || echo "install.sh: warning: podman not installed; tests/test_docker.py will try again" >&2 ;;
        *) echo "install.sh: unknown GATEPRO_SYSTEM_PACKAGES entry '$pkg' (known: slurm, podman)" >&2; exit 2 ;;
    esac
done
# Hugging Face interop (gatepro-convert, tests/test_hf*.py): the `hf` extra, with torch held at the
# pinned version by a constraint so that nothing it pulls in can upgrade torch.
if wants hf && ! ${PYTHON:-python3} launch/installed.py hf 2>/dev/null; then
    TORCH_PIN="$(mktemp)"
    echo "torch==$TORCH_VERSION" > "$TORCH_PIN"
    $PIP install --quiet --disable-pip-version-check -c "$TORCH_PIN" -e ".[hf]"
    rm -f "$TORCH_PIN"
fi
