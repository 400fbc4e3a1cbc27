#!/usr/bin/env bash
# The core suite at one torch version, in a fresh virtual environment outside the repository:
#
#   bash tests/torch_matrix.sh [--venv DIR] [--reuse] VERSION [pytest args]
#
#   VERSION    an exact torch release, e.g. 2.11.0 (launch/install.sh pins torch==VERSION)
#   --venv DIR where the environment goes; default: gatepro-torch-VERSION in the system temp dir.
#              It is deleted and made again on every run, so it must be new, empty, or one this
#              script made (it leaves a .gatepro-torch-matrix file there).
#   --reuse    keep an environment this script made before (a CUDA build of torch is several GB)
#
# e.g.  bash tests/torch_matrix.sh 2.11.0
#       bash tests/torch_matrix.sh --reuse 2.14.1 -x -k dp_shard
#
# The project is installed editable from this checkout (launch/install.sh, no optional
# integrations), so the tests run against the code here. Exit status: pytest's.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

VENV="" REUSE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) VENV="${2:?--venv needs a directory}"; shift 2 ;;
        --venv=*) VENV="${1#--venv=}"; shift ;;
        --reuse) REUSE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "torch_matrix.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) break ;;
    esac
done
VERSION="${1:-}"
if ! [[ "$VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
    echo "torch_matrix.sh: give an exact torch version such as 2.11.0 (got '${VERSION}')" >&2
    usage >&2
    exit 2
fi
shift

# The core suite: routing, dispatch, EP parity, trainer, checkpoints and resharding, dp_shard,
# host syncs, device placement, experts, bf16 (and the fake accelerator once it exists).
CORE_TESTS=(
    tests/test_routing.py tests/test_routing_margin.py
    tests/test_dispatch_conservation.py
    tests/test_moe_parallel.py
    tests/test_trainer.py
    tests/test_checkpoint_tensors.py tests/test_checkpoint_integrity.py
    tests/test_dp_shard.py tests/test_dp_shard_router.py
    tests/test_host_syncs.py
    tests/test_device_placement.py tests/test_step_state_on_device.py
    tests/test_experts.py tests/test_expert_kernel.py
    tests/test_bf16.py
)
[ -f tests/test_fake_accelerator.py ] && CORE_TESTS+=(tests/test_fake_accelerator.py)

BASE_PYTHON="${BASE_PYTHON:-python3}"
VENV="${VENV:-$("$BASE_PYTHON" -c 'import tempfile; print(tempfile.gettempdir())')/gatepro-torch-$VERSION}"
VENV="$(realpath -m "$VENV")"
case "$VENV/" in
    "$(pwd -P)"/*) echo "torch_matrix.sh: --venv $VENV is inside the repository; choose a directory outside it" >&2; exit 2 ;;
esac
MARK="$VENV/.gatepro-torch-matrix"
if [ -e "$VENV" ] && [ ! -e "$MARK" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ]; then
    echo "torch_matrix.sh: $VENV exists and was not made by this script; choose another --venv" >&2
    exit 2
fi
if [ "$REUSE" = 0 ] || [ ! -e "$MARK" ]; then
    rm -rf "$VENV"
    "$BASE_PYTHON" -m venv "$VENV" && touch "$MARK" || exit 1
fi

PYTHON="$VENV/bin/python"
started=$SECONDS
PYTHON="$PYTHON" GATEPRO_TORCH_VERSION="$VERSION" bash launch/install.sh || exit 1
installed=$((SECONDS - started))
torch_built="$("$PYTHON" -c 'import torch; print(torch.__version__)')" || exit 1
echo "torch_matrix.sh: torch $torch_built in $VENV (installed in ${installed}s); ${#CORE_TESTS[@]} test files"

started=$SECONDS
"$PYTHON" -m pytest -q -p no:cacheprovider "${CORE_TESTS[@]}" "$@"
code=$?
echo "torch_matrix.sh: torch $torch_built: pytest exit status $code after $((SECONDS - started))s"
exit "$code"
