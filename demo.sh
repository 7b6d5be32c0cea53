#!/usr/bin/env bash
# The main job on the built-in demo guest: install what is needed, bring the lab up, show the
# guest's processes and sockets from outside, enforce a block, show it working, tear down.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/scripts/bootstrap.sh"
exec "$here/.venv/bin/python" -m xfgate_lab.demo "$@"
