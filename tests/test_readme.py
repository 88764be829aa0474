"""The README's local examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def local_examples() -> str:
    """Every Python block before the serving section, in order, as one script."""
    text = README.read_text()
    local = text[: text.index("## Serving a model")]
    return "\n".join(re.findall(r"```python\n(.*?)```", local, flags=re.S))


@pytest.mark.slow
def test_readme_local_examples_run():
    script = local_examples()
    assert "nt.load(" in script and "m.patch(" in script and "grad=True" in script
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
