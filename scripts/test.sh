#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: sets up .venv, then lint, types, tests.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
echo "== ruff"; .venv/bin/ruff check .
echo "== ruff format"; .venv/bin/ruff format --check --quiet .
echo "== mypy --strict"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest --cov --cov-report=term:skip-covered "$@"
