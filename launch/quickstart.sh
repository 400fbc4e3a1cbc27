#!/usr/bin/env bash
# The README's main job: install, then train a small MoE language model with GatePro on CPU:
# 2 processes (torchrun), experts split over both (ep=2), the Python stdlib sources as corpus.
# Extra arguments are config overrides, e.g.  bash launch/quickstart.sh train.steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
NPROC="${NPROC:-2}"
exec ${PYTHON:-python3} -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m gatepro_dist.cli.train configs/quickstart.yaml "$@"
