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
  -e "integrations/langchain[agents,test]" -e "integrations/langgraph[test]" \
  -e "integrations/llamaindex[test]"
