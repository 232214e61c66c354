"""scripts/install.sh with Debian's own Python, the one a stock Debian 12 machine has.

Debian's /usr/bin/python3 refuses `pip install` outside a virtual environment (PEP 668); the
machine's first python3 may be another one, which is why this test names Debian's explicitly.
It runs the real script into a fresh virtual environment with the main dependencies only (no
extras: the vLLM build takes minutes and is exercised by every worker test, which CI runs from
the .venv the same script makes with all extras) and proves that this environment is made from
Debian's Python, that every documented `chatai` command is there, and that the commands a user
runs first work without the test extra (`chatai dev` imports the OpenAI SDK).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # pip installs packages (a minute or two)

ROOT = Path(__file__).resolve().parents[1]
DEBIAN_PYTHON = Path("/usr/bin/python3")
# Every command the README documents.
DOCUMENTED = ("dev", "gateway", "keys", "batch", "broker", "breaker", "worker", "scale", "autoscale",
              "make-tiny-model", "bench")


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=900, **kw)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("install") / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = _run(["bash", str(ROOT / "scripts" / "install.sh")], cwd=ROOT,
                env={**env, "CHATAI_VENV": str(path), "CHATAI_EXTRAS": "", "CHATAI_SKIP_APT": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return path


def test_debian_python_is_externally_managed():
    """The premise: without a virtual environment, Debian's Python takes no pip installs."""
    version = _run([str(DEBIAN_PYTHON), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"]).stdout.strip()
    assert (Path(f"/usr/lib/python{version}") / "EXTERNALLY-MANAGED").is_file()


def test_install_makes_a_venv_from_debian_python(venv: Path):
    cfg = dict(line.split(" = ", 1) for line in (venv / "pyvenv.cfg").read_text().splitlines() if " = " in line)
    assert cfg["home"] == "/usr/bin" and cfg["include-system-site-packages"] == "false"
    base = _run([str(venv / "bin" / "python"), "-c", "import sys; print(sys.base_prefix)"]).stdout.strip()
    assert base == "/usr"
    # The checkout itself is what is installed (editable): no PYTHONPATH needed.
    where = _run([str(venv / "bin" / "python"), "-c", "import chatai, gateway; print(chatai.__file__, gateway.__file__)"],
                 env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd="/")
    assert where.returncode == 0, where.stderr
    assert all(p.startswith(str(ROOT)) for p in where.stdout.split())


def test_every_documented_command_runs_from_the_venv(venv: Path, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    chatai = str(venv / "bin" / "chatai")
    top = _run([chatai, "--help"], env=env)
    assert top.returncode == 0, top.stderr
    for name in DOCUMENTED:
        helped = _run([chatai, name, "--help"], env=env)
        assert helped.returncode == 0, f"chatai {name} --help: {helped.stderr[-2000:]}"
    # A command that does its job without any service: an API key, stored hashed.
    made = _run([chatai, "keys", "create", "--name", "install-test", "--state-dir", str(tmp_path)], env=env)
    assert made.returncode == 0 and made.stdout.split("\t")[1].startswith("sk-"), made.stderr
    listed = _run([chatai, "keys", "list", "--state-dir", str(tmp_path)], env=env)
    assert made.stdout.split("\t")[0] in listed.stdout  # the key's id (the table may wrap its name)


def test_chatai_dev_needs_no_test_extra(venv: Path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    python = str(venv / "bin" / "python")
    assert _run([python, "-c", "import pytest"], env=env).returncode != 0  # the test extra is not there
    # `chatai dev` proves the stack with the official SDK, and the gateway it starts serves pages.
    done = _run([python, "-c", "import openai, gateway.app, gateway.web"], env=env)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_second_install_is_quick_and_keeps_the_venv(venv: Path):
    """scripts/dev.sh and scripts/test.sh run the install every time: with pyproject.toml and the
    extras unchanged it leaves the environment as it is (the install is editable)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    before = (venv / "pyvenv.cfg").stat().st_mtime_ns
    again = _run(["bash", str(ROOT / "scripts" / "install.sh")], cwd=ROOT,
                 env={**env, "CHATAI_VENV": str(venv), "CHATAI_EXTRAS": "", "CHATAI_SKIP_APT": "1"})
    assert again.returncode == 0, again.stderr[-2000:]
    assert "is up to date" in again.stdout and "pip install" not in again.stdout
    assert (venv / "pyvenv.cfg").stat().st_mtime_ns == before
