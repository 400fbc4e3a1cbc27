#!/usr/bin/env bash
# The test command: installs what the suite needs, then runs it. Exit code 5 (no tests) fails.
set -uo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh || exit 1
${PYTHON:-python3} -m pytest -q -p no:cacheprovider "$@"
code=$?
if [ "$code" -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi
exit "$code"
