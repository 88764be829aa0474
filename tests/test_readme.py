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


@pytest.mark.slow
def test_readme_remote_example_runs_where_the_model_never_loaded():
    from serving import Server

    text = README.read_text()
    serving = text[text.index("## Serving a model") :]
    script = re.findall(r"```python\n(.*?)```", serving, flags=re.S)[0]
    # the client process may not load a model: what it knows of the model comes from the server
    guard = (
        "import transformers\n"
        "def refuse(*args, **kwargs):\n"
        "    raise AssertionError('the client loaded a model')\n"
        "transformers.PreTrainedModel.from_pretrained = classmethod(refuse)\n"
    )
    check = "\nassert rm.decode(out.logits[0, -1].argmax()) == ' Paris', rm.decode(out.logits[0, -1].argmax())\n"
    server = Server("smollm2-135m")
    try:
        script = guard + script.replace("http://127.0.0.1:8000", server.url) + check
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        server.stop()


@pytest.mark.slow
def test_readme_plot_example_draws_its_pictures(tmp_path):
    text = README.read_text()
    plots = text[text.index("### Plots and tables") :]
    script = re.findall(r"```python\n(.*?)```", plots, flags=re.S)[0]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("attention.png", "lens.png", "patching.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
