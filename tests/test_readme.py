"""The README's local examples run as written."""

from __future__ import annotations

import re
import resource
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
HANG = 3600  # seconds of wall-clock time after which a script is taken to hang
# CPU seconds each script took on the shared 2-core development machine, the most of its runs there: with an
# empty model cache (so with the first conversions of the GGUF models it loads) or niced at load 8 to 10, where
# torch's two threads spend CPU time waiting for each other (up to 2.5 times what a warm run takes at normal
# priority: 38 s for the local examples, 32 s for the plot example, 6 s for the remote client; the datasets
# section's collect command 12 s, its script 13 s, niced at load 6 to 10 and the collect from an empty cache).
# Each script is held to CPU_MARGIN times its figure: room for a slower or busier machine, not for a script gone
# wrong.
MEASURED_CPU = {"local": 127, "remote": 8, "plot": 80, "collect": 40, "datasets": 31}
CPU_MARGIN = 4


def run_python(script: str, cpu_seconds: int, **kwargs) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter, held to ``cpu_seconds`` of CPU time (user + system, every thread).
    The bound is on CPU time rather than wall-clock time: on a machine shared with
    other work, a niced script spends most of its wall-clock time waiting for a core
    (the local examples once took 393 s of it at load 10 to 14); the CPU time is
    what it costs wherever it runs. ``HANG`` only ends a script that hangs.
    """

    return run([sys.executable, "-c", script], cpu_seconds, **kwargs)


def run(command: list[str], cpu_seconds: int, **kwargs) -> subprocess.CompletedProcess:
    """``command`` held to ``cpu_seconds`` of CPU time, as :func:`run_python`."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 10))

    result = subprocess.run(command, capture_output=True, text=True, timeout=HANG, preexec_fn=limit, **kwargs)
    if result.returncode == -signal.SIGXCPU:
        result.stderr += f"\n(stopped after {cpu_seconds} s of CPU time)"
    return result


def local_examples() -> str:
    """Every Python block before the serving section, in order, as one script."""
    text = README.read_text()
    local = text[: text.index("## Serving a model")]
    return "\n".join(re.findall(r"```python\n(.*?)```", local, flags=re.S))


@pytest.mark.slow
def test_readme_local_examples_run():
    script = local_examples()
    assert "nt.load(" in script and "m.patch(" in script and "grad=True" in script
    result = run_python(script, cpu_seconds=CPU_MARGIN * MEASURED_CPU["local"])
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
    with Server("smollm2-135m") as server:
        script = guard + script.replace("http://127.0.0.1:8000", server.url) + check
        result = run_python(script, cpu_seconds=CPU_MARGIN * MEASURED_CPU["remote"])  # the client alone
        assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_readme_plot_example_draws_its_pictures(tmp_path):
    text = README.read_text()
    plots = text[text.index("### Plots and tables") :]
    script = re.findall(r"```python\n(.*?)```", plots, flags=re.S)[0]
    result = run_python(script, cpu_seconds=CPU_MARGIN * MEASURED_CPU["plot"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("attention.png", "lens.png", "patching.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_readme_dataset_example_reads_what_its_first_command_wrote(tmp_path):
    from serving import LAUNCH

    text = README.read_text()
    datasets = text[text.index("## Activation datasets") :]
    command = shlex.split(re.findall(r"```bash\n(.*)\n", datasets)[0])  # the first line: the bundled corpus
    assert command[:2] == ["neurotap", "collect"] and "--data" not in command
    neurotap = [sys.executable, "-c", LAUNCH]
    collected = run(neurotap + command[1:], cpu_seconds=CPU_MARGIN * MEASURED_CPU["collect"], cwd=tmp_path)
    assert collected.returncode == 0, collected.stderr[-3000:]
    script = re.findall(r"```python\n(.*?)```", datasets, flags=re.S)[0]
    result = run_python(script, cpu_seconds=CPU_MARGIN * MEASURED_CPU["datasets"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    *top, by_topk = result.stdout.splitlines()
    assert len(top) == 3, result.stdout
    # the stored activations' largest value of unit 42 is where a TopK probe on a live forward found it
    assert top[0].split(maxsplit=1)[1].strip() == by_topk.strip(), result.stdout
    shown = re.search(r"print\(example\) +# (.*)", script).group(1)
    assert top[0].split() == shown.split(), "the README shows another first example than the script prints"
