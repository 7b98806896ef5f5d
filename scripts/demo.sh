#!/usr/bin/env bash
# The demo on the embedded defaults: memory budgets, SQLite traces, a scripted model.
# No API key, no server. Ends with the `agentguard report` table.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
.venv/bin/python examples/demo.py "$@"
