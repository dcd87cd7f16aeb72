"""Repository contracts: CI runs exactly the README's test command; the CLI starts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_ci_runs_the_readme_test_command() -> None:
    commands = _readme_commands()
    assert len(commands) >= 2, "README must show the start command and the test command"
    test_command = commands[1]
    ci_lines = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    ci_command = ci_lines[-1].replace("python -m pip install --quiet ", "pip install ")
    assert ci_command == test_command


def test_cli_help_lists_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "adapterforge.cli", "--help"], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert "demo-model" in out.stdout
    assert "usage: adapterforge" in out.stdout
