#!/usr/bin/env bash
# The test command: installs what the suite needs, then runs it. Exit code 5 (no tests) fails.
set -uo pipefail
cd "$(dirname "$0")/.."
# The suite needs DeepSpeed, Megatron-core and the Hugging Face libraries (backend and interop
# tests), mpi4py + Open MPI (pip), a Slurm cluster and podman (apt); install.sh brings them all.
GATEPRO_WITH="${GATEPRO_WITH:-deepspeed megatron hf}" \
GATEPRO_EXTRAS="${GATEPRO_EXTRAS:+$GATEPRO_EXTRAS,}mpi,tensorboard,wandb" GATEPRO_SYSTEM_PACKAGES="${GATEPRO_SYSTEM_PACKAGES:-slurm podman}" \
    bash launch/install.sh || exit 1
${PYTHON:-python3} -m pytest -q -p no:cacheprovider --durations=30 "$@"
code=$?
if [ "$code" -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi
exit "$code"
