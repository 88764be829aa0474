"""The command line: a user's mistake gets a one-line error and exit status 2, not a traceback."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neurotap", *args], capture_output=True, text=True, timeout=120)


def test_an_unknown_model_is_a_clear_error(tmp_path):
    result = run("points", str(tmp_path / "no-such-model"))
    assert result.returncode == 2
    assert "is not a built-in model (smollm2-135m), a folder with a config.json, a .gguf file" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_every_command():
    result = run("--help")
    assert result.returncode == 0
    for command in ("demo", "points", "serve", "collect"):
        assert command in result.stdout


def test_version_and_every_help_shows_defaults():
    import neurotap

    assert run("--version").stdout.strip() == f"neurotap {neurotap.__version__}"
    for command in ("demo", "points", "serve", "collect"):
        result = run(command, "--help")
        assert result.returncode == 0 and ("(default:" in result.stdout or command == "points"), command
