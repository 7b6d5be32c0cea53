#!/usr/bin/env bash
# The whole test suite: lint, types, unit tests and the real-lab tests (QEMU guest, NFQUEUE,
# iptables, httperf inside network namespaces). Run as root on a Debian 12 machine.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/scripts/bootstrap.sh"
cd "$here"
.venv/bin/ruff check xfgate xfgate_lab bench tests
.venv/bin/ruff format --check xfgate xfgate_lab bench tests
.venv/bin/mypy
exec .venv/bin/pytest -q -rs "$@"
