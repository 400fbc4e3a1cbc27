#!/usr/bin/env bash
# Installs the project and its test tools into the current Python environment.
# torch is installed first and pinned: any looser request resolves to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PYTHON:-python3} -m pip"
TORCH_VERSION="${GATEPRO_TORCH_VERSION:-2.13.0}"
if ! ${PYTHON:-python3} -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    $PIP install --quiet "torch==$TORCH_VERSION"
fi
$PIP install --quiet --disable-pip-version-check -e ".[test${GATEPRO_EXTRAS:+,$GATEPRO_EXTRAS}]"
