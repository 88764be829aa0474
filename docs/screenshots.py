"""Remake the README's screenshots of the web inspector and nt.plot: ``python docs/screenshots.py``.

Collects a small dataset of SmolLM2's layer-6 MLP product from the bundled
corpus, starts ``neurotap serve`` (the built-in SmolLM2-135M) with a token and
that dataset on a free port, drives headless Chromium through each view for the
README's prompt, and writes ``docs/inspector-*.png``; then draws the same
prompt's attention head and logit lens with ``nt.plot`` into ``docs/plot-*.png``.
Needs Debian's chromium and chromium-driver, and matplotlib.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

PROMPT = "The Eiffel Tower is located in the city of"
HERE = Path(__file__).parent
LAUNCH = "import sys; from neurotap.cli import main; sys.exit(main())"


def ready(browser, map_id: str, point: str, head: str = "") -> None:
    script = (
        f"const m = document.getElementById('{map_id}');"
        "return m.dataset.state === 'ready' && m.dataset.point + '/' + (m.dataset.head || '')"
    )
    drawn = f"{point}/{head}"
    WebDriverWait(browser, 300).until(lambda b: b.execute_script(script) == drawn, f"{drawn} was not drawn")


EXAMPLES_POINT = "model.layers.6.mlp.mul"


def collected(folder: Path) -> int:
    """A small dataset of ``EXAMPLES_POINT`` in ``folder``; the unit whose largest value is the largest."""
    import neurotap as nt

    ds = nt.collect(nt.load("smollm2-135m"), [EXAMPLES_POINT], folder, seq_len=64, tokens=4096, progress=False)
    return int(ds.read(EXAMPLES_POINT).float().amax(dim=0).argmax())


def plots(url: str, token: str) -> None:
    """The README prompt's attention head and logit lens, drawn by nt.plot from the server's answers."""
    import httpx
    import torch

    import neurotap as nt

    with nt.connect(url, token=token) as rm:
        ids = rm.encode(PROMPT)
        point = "model.layers.5.self_attn.attention_interface.softmax"
        rm.forward(ids, probes=[nt.probe(point, nt.Record())], outputs=[])
        tokens = [rm.decode([i]) for i in ids[0]]
        nt.plot.attention(rm.recordings(), 5, 3, tokens=tokens, path=HERE / "plot-attention.png")
    headers = {"X-Neurotap-Protocol": "1", "Authorization": f"Bearer {token}"}
    lens = httpx.post(url + "/v1/logit_lens", json={"text": PROMPT}, headers=headers, timeout=600).json()
    nt.plot.logit_lens(lens, path=HERE / "plot-lens.png")
    body = {"clean": PROMPT, "corrupt": "The Colosseum is located in the city of", "target": " Paris"}
    patched = httpx.post(url + "/v1/patching", json=body, headers=headers, timeout=900).json()
    title = f"activation patching: {patched['metric']}"
    values = torch.tensor(patched["values"])
    nt.plot.heatmap(
        values, rows=patched["points"], cols=patched["tokens"], title=title, path=HERE / "plot-patching.png"
    )


def main() -> None:
    scratch = Path(tempfile.mkdtemp())
    token = secrets.token_urlsafe(24)
    (scratch / "tokens.txt").write_text(token + "\n")
    unit = collected(scratch / "acts")
    server = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "serve", "--port", "0", "--token-file", str(scratch / "tokens.txt")]
        + ["--dataset", str(scratch / "acts")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    options = Options()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"):
        options.add_argument(flag)
    for flag in ("--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,760")
    options.add_argument(f"--user-data-dir={scratch / 'chromium'}")
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        line = server.stdout.readline()
        url = line.split(" on ")[1].split()[0]
        browser.get(url + "/")
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "login").is_displayed())
        browser.save_screenshot(str(HERE / "inspector-login.png"))
        browser.find_element(By.ID, "token").send_keys(token)
        browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tokens .token"))

        for group in ("layers", "0", "self_attn", "o_proj"):  # open the tree down to layer 0's attention output
            summaries = browser.find_elements(By.XPATH, f"//details[not(@open)]/summary[text()='{group}']")
            summaries[0].click()
        point = "model.layers.0.self_attn.o_proj.output"
        row = browser.find_element(By.CSS_SELECTOR, f'#tree .point[data-name="{point}"]')
        row.click()
        ready(browser, "point-map", point)
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'}); window.scrollTo(0, 0)", row)
        browser.save_screenshot(str(HERE / "inspector-tree.png"))

        search = browser.find_element(By.ID, "search")
        search.send_keys("layers.3.mlp")
        point = "model.layers.3.mlp.mul"
        browser.find_element(By.CSS_SELECTOR, f'#tree .point[data-name="{point}"]').click()
        ready(browser, "point-map", point)
        browser.save_screenshot(str(HERE / "inspector-point.png"))

        search.clear()
        search.send_keys("layers.9.output")
        point = "model.layers.9.output"
        browser.find_element(By.CSS_SELECTOR, f'#tree .point[data-name="{point}"]').click()
        ready(browser, "point-map", point)
        browser.save_screenshot(str(HERE / "inspector-residual.png"))

        browser.find_element(By.CSS_SELECTOR, '#tabs button[data-view="attention"]').click()
        Select(browser.find_element(By.ID, "layer")).select_by_visible_text("5")
        Select(browser.find_element(By.ID, "head")).select_by_visible_text("3")
        ready(browser, "attention-map", "model.layers.5.self_attn.attention_interface.softmax", "3")
        browser.save_screenshot(str(HERE / "inspector-attention.png"))

        browser.find_element(By.CSS_SELECTOR, '#tabs button[data-view="lens"]').click()
        script = "return document.getElementById('lens-map').dataset.state"
        WebDriverWait(browser, 300).until(lambda b: b.execute_script(script) == "ready", "no logit lens")
        browser.set_window_size(1280, 900)
        browser.save_screenshot(str(HERE / "inspector-lens.png"))

        browser.find_element(By.CSS_SELECTOR, '#tabs button[data-view="patching"]').click()  # its defaults
        script = "return document.getElementById('patching-map').dataset.state"
        WebDriverWait(browser, 900).until(lambda b: b.execute_script(script) == "ready", "no patching heat map")
        browser.save_screenshot(str(HERE / "inspector-patching.png"))

        browser.set_window_size(1280, 760)
        browser.find_element(By.CSS_SELECTOR, '#tabs button[data-view="examples"]').click()
        Select(browser.find_element(By.ID, "examples-point")).select_by_visible_text(EXAMPLES_POINT)
        box = browser.find_element(By.ID, "examples-unit")
        box.clear()
        box.send_keys(str(unit))
        browser.find_element(By.ID, "examples-run").click()
        script = "const l = document.getElementById('examples-list'); return l.dataset.state + '/' + l.dataset.unit"
        WebDriverWait(browser, 300).until(lambda b: b.execute_script(script) == f"ready/{unit}", "no examples")
        browser.save_screenshot(str(HERE / "inspector-examples.png"))
        plots(url, token)
    finally:
        browser.quit()
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
