"""The web inspector in a real headless Chromium, against a real ``neurotap inspect`` with tokens.

``neurotap inspect`` is ``neurotap serve`` (the same code) that also opens the page in a browser.

Values the page draws are read back from its DOM (the heat map cells' data
attributes) and compared with the same values computed here by the plain
transformers model, without neurotap. Screenshots of each view are saved under
the test's temporary folder.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from neurotap.transport.wire import PROTOCOL, PROTOCOL_HEADER
from serving import WORDS, Server, restored_probabilities

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -r requirements-dev.txt")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

TOKEN = "inspector-token-0123456789"
PROMPT = "the old capital of france is paris"
MUL = "model.layers.0.mlp.mul"
SIGNED = {PROTOCOL_HEADER: str(PROTOCOL), "Authorization": f"Bearer {TOKEN}"}  # what a signed-in page sends
WAIT = 60  # seconds a page may take to reach a state; a wait, never an assertion on time


def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no browser here (apt-get install chromium chromium-driver), as .ci/run does")
    return chromium, driver


class Inspecting(Server):
    """``neurotap inspect`` in its own process, with a token file.

    Its "browser" is a script that writes down the address it was asked to open.
    """

    def __init__(self, folder: Path, where: Path, *args: str) -> None:
        (where / "tokens.txt").write_text(TOKEN + "\n")
        (where / "browser.py").write_text("import pathlib, sys\npathlib.Path(sys.argv[1]).write_text(sys.argv[2])\n")
        self.opened = where / "opened.txt"
        browser = f"{sys.executable} {where / 'browser.py'} {self.opened} %s"
        super().__init__(
            folder, "--token-file", str(where / "tokens.txt"), *args, command="inspect", env={"BROWSER": browser}
        )
        deadline = time.monotonic() + 60  # it opens the page once the server answers; not an assertion on speed
        while not self.opened.exists() and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if not self.opened.exists():
            self.stop()
            raise RuntimeError(f"neurotap inspect opened no browser:\n{''.join(self.log)}")


@pytest.fixture(scope="module")
def acts(folder, tmp_path_factory) -> Path:
    """A small activation dataset of the tiny model's MLP product, collected from sentences of its words."""
    import random

    import neurotap as nt

    where = tmp_path_factory.mktemp("acts")
    pick = random.Random(0)
    words = [w for w in WORDS if w not in ("<unk>", "<pad>")]
    (where / "corpus.txt").write_text("\n\n".join(" ".join(pick.choices(words, k=12)) for _ in range(24)))
    nt.collect(nt.load(str(folder)), [MUL], where / "acts", data=where / "corpus.txt", seq_len=8, progress=False)
    return where / "acts"


@pytest.fixture(scope="module")
def server(folder, acts, tmp_path_factory):
    with Inspecting(folder, tmp_path_factory.mktemp("inspect"), "--dataset", str(acts)) as running:
        yield running


@pytest.fixture(scope="module")
def plain(folder):
    """The same model as plain transformers, and its tokenizer: the independent reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = browser_paths()
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()


def wait(browser, condition, message):
    """Wait for ``condition``; ``message`` may be a function, read only when the wait fails
    (so it shows the page's errors at that moment, not before the wait began)."""
    try:
        return WebDriverWait(browser, WAIT).until(condition)
    except TimeoutException:
        raise AssertionError(message() if callable(message) else message) from None


def shown(browser, element_id: str) -> bool:
    return browser.execute_script(f"return !document.getElementById({element_id!r}).hidden")


def cells(browser, selector: str) -> list[list]:
    return browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".map(r => [Number(r.dataset.row), Number(r.dataset.col), Number(r.dataset.value)])",
        selector,
    )


def as_matrix(found: list[list]) -> torch.Tensor:
    rows = 1 + max(r for r, _, _ in found)
    cols = 1 + max(c for _, c, _ in found)
    matrix = torch.full((rows, cols), float("nan"))
    for r, c, v in found:
        matrix[r, c] = v
    return matrix


def errors_of(browser) -> str:
    return browser.execute_script("return document.getElementById('error').textContent")


def wait_drawn(browser, element_id: str, what: str, **data: str) -> None:
    """Wait until the view ``element_id`` is drawn (``data-state="ready"``) with these ``data-`` attributes."""

    def drawn(b) -> bool:
        found = b.execute_script("return {...document.getElementById(arguments[0]).dataset}", element_id)
        return found.get("state") == "ready" and all(found.get(key) == value for key, value in data.items())

    wait(browser, drawn, lambda: f"{what} did not appear: {errors_of(browser)}")


def fill(browser, **fields: object) -> None:
    """Type each value into the box of that id, in place of what it held."""
    for field, value in fields.items():
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(str(value))


def layer_0_mlp_product(model, ids: torch.Tensor) -> torch.Tensor:
    """The plain model's first MLP product on ``ids``, from the MLP's input caught by a hand hook."""
    mlp = model.model.layers[0].mlp
    captured = {}
    handle = mlp.register_forward_hook(lambda m, args, out: captured.update(x=args[0]))
    try:
        with torch.no_grad():
            model(ids)
            return mlp.act_fn(mlp.gate_proj(captured["x"])) * mlp.up_proj(captured["x"])
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def signed_in(browser, server):
    """The page, signed in with the token, with PROMPT tokenized."""
    browser.get(server.url + "/")
    wait(browser, lambda b: shown(b, "login"), "the page did not ask for a token")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#tokens .token"), "no tokens after signing in")
    fill(browser, prompt=PROMPT)
    browser.find_element(By.ID, "run").click()
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#tokens .token")) == len(PROMPT.split()), "tokens")
    return browser


# -- without a browser ----------------------------------------------------------------------------------


def test_page_loads_without_a_token_but_no_data_does(server, plain):
    headers = {PROTOCOL_HEADER: str(PROTOCOL)}
    with httpx.Client(base_url=server.url) as http:
        page = http.get("/")
        assert page.status_code == 200 and "app.js" in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert http.get("/static/app.js").status_code == 200
        assert http.get("/static/..%2Fweb.py").status_code == 404
        assert http.post("/v1/tokenize", json={"text": PROMPT}, headers=headers).status_code == 401
        assert http.get("/v1/points", headers=headers).status_code == 401
        answer = http.post("/v1/tokenize", json={"text": PROMPT}, headers=SIGNED)
        assert answer.status_code == 200
        assert answer.json()["ids"] == plain[1](PROMPT).input_ids
        assert answer.json()["tokens"] == PROMPT.split()
        too_long = http.post("/v1/tokenize", json={"text": "a " * 5000}, headers=SIGNED)
        assert too_long.status_code == 413 and "at most 8000" in too_long.json()["message"]
        assert http.post("/v1/tokenize", content=b"[1]", headers=SIGNED).status_code == 400
        huge = http.post("/v1/tokenize", content=b" " * (65 << 10), headers=SIGNED)
        assert huge.status_code == 413
        other_page = {**SIGNED, "Origin": "http://attacker.example"}
        assert http.post("/v1/tokenize", json={"text": "a"}, headers=other_page).status_code == 403


def test_the_logit_lens_is_held_to_the_request_memory_limit(folder):
    with Server(folder, "--max-request-memory", "4096") as running:
        answer = httpx.post(
            running.url + "/v1/logit_lens", json={"text": PROMPT}, headers={PROTOCOL_HEADER: str(PROTOCOL)}
        )
    assert answer.status_code == 413, answer.text
    assert "--max-request-memory" in answer.json()["message"]


# -- in the browser ------------------------------------------------------------------------------------


def test_without_the_token_the_page_shows_a_login_prompt_and_no_data(browser, server, artifacts):
    browser.get(server.url + "/")
    wait(browser, lambda b: shown(b, "login"), "the page did not ask for a token")
    assert not shown(browser, "main")
    assert browser.find_elements(By.CSS_SELECTOR, "#tree *") == []
    assert browser.find_elements(By.CSS_SELECTOR, "#tokens *") == []
    assert browser.find_element(By.ID, "model").text == ""
    # what a script on the page could fetch without the token: nothing
    status = browser.execute_async_script(
        "const done = arguments[0];"
        "fetch('/v1/points', {headers: {'X-Neurotap-Protocol': '1'}}).then(r => done(r.status));"
    )
    assert status == 401
    browser.save_screenshot(str(artifacts / "login.png"))

    browser.find_element(By.ID, "token").send_keys("wrong-token-0123456789")
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait(browser, lambda b: "refused" in b.find_element(By.ID, "login-error").text, "a wrong token was not refused")
    assert not shown(browser, "main")
    assert browser.find_elements(By.CSS_SELECTOR, "#tree *") == []


def test_tokens_and_points_tree(signed_in, plain, server):
    browser = signed_in
    ids = [int(t.get_attribute("data-id")) for t in browser.find_elements(By.CSS_SELECTOR, "#tokens .token")]
    assert ids == plain[1](PROMPT).input_ids
    fill(browser, search="mlp.mul")
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, f'#tree .point[data-name="{MUL}"]'), "search")
    names = [row.get_attribute("data-name") for row in browser.find_elements(By.CSS_SELECTOR, "#tree .point")]
    assert names == [f"model.layers.{i}.mlp.mul" for i in range(len(names))] and len(names) >= 2
    row = browser.find_element(By.CSS_SELECTOR, f'#tree .point[data-name="{MUL}"]')
    assert row.find_element(By.CSS_SELECTOR, ".kind").text == "op"
    assert row.find_element(By.CSS_SELECTOR, ".dtype").text == "float32"
    assert "act_fn" in row.find_element(By.CSS_SELECTOR, ".source").get_attribute("title")


def test_a_point_heat_map_holds_the_values_the_model_computes(signed_in, plain, artifacts):
    browser = signed_in
    model, tokenizer = plain
    fill(browser, search=MUL)
    row = wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, f'#tree .point[data-name="{MUL}"]'), "search")[0]
    row.click()
    wait_drawn(browser, "point-map", f"the heat map of {MUL}", point=MUL)
    shown_values = as_matrix(cells(browser, "#point-map rect.cell"))
    norms = as_matrix([[r, 0, v] for r, _, v in cells(browser, "#point-map rect.extra-cell")])[:, 0]
    expected = layer_0_mlp_product(model, torch.tensor([tokenizer(PROMPT).input_ids]))[0]
    torch.testing.assert_close(shown_values, expected[:, :256], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norms, expected.norm(dim=-1), rtol=1e-5, atol=1e-6)

    browser.execute_script(
        'document.querySelector(\'#point-map rect.cell[data-row="2"][data-col="3"]\')'
        ".dispatchEvent(new MouseEvent('mouseover', {bubbles: true}))"
    )
    hover = browser.find_element(By.ID, "hover").text
    assert "unit 3" in hover and f"{expected[2, 3].item():.5g}"[:5] in hover
    browser.save_screenshot(str(artifacts / "point.png"))


def test_an_attention_head_is_the_softmax_the_model_computes(signed_in, plain, artifacts):
    browser = signed_in
    model, tokenizer = plain
    layer, head = 1, 2
    browser.find_element(By.CSS_SELECTOR, '#tabs button[data-view="attention"]').click()
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#layer option"), "no layers to pick")
    Select(browser.find_element(By.ID, "layer")).select_by_visible_text(str(layer))
    Select(browser.find_element(By.ID, "head")).select_by_visible_text(str(head))
    name = f"model.layers.{layer}.self_attn.attention_interface.softmax"
    wait_drawn(browser, "attention-map", "the attention pattern", point=name, head=str(head))
    pattern = as_matrix(cells(browser, "#attention-map rect.cell"))
    with torch.no_grad():
        attentions = model(torch.tensor([tokenizer(PROMPT).input_ids]), output_attentions=True).attentions
    torch.testing.assert_close(pattern, attentions[layer][0, head], rtol=1e-5, atol=1e-6)
    labels = browser.execute_script(
        "return Array.from(document.querySelectorAll('#attention-map .row-label')).map(t => t.textContent)"
    )
    assert labels == PROMPT.split()
    browser.save_screenshot(str(artifacts / "attention.png"))


def test_inspect_serves_and_opens_the_page(server):
    assert server.opened.read_text() == server.url + "/"  # it opened the address it says it serves on


def test_the_logit_lens_is_each_layer_through_the_final_norm_and_unembedding(signed_in, plain, server, artifacts):
    browser = signed_in
    model, tokenizer = plain
    browser.find_element(By.CSS_SELECTOR, '#tabs button[data-view="lens"]').click()
    wait_drawn(browser, "lens-map", "the logit lens")
    found = browser.execute_script(
        "return Array.from(document.querySelectorAll('#lens-map rect.lens-cell')).map(r =>"
        " [Number(r.dataset.layer), Number(r.dataset.pos), Number(r.dataset.id), Number(r.dataset.prob)])"
    )
    layers = model.model.layers
    residuals = {}

    def keeper(i):
        return lambda m, args, out: residuals.setdefault(i, out[0] if isinstance(out, tuple) else out)

    handles = [layer.register_forward_hook(keeper(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(torch.tensor([tokenizer(PROMPT).input_ids]))
        logits = [model.lm_head(model.model.norm(residuals[i]))[0] for i in range(len(layers))]
        probs = torch.softmax(torch.stack(logits), dim=-1)
    for handle in handles:
        handle.remove()
    best, ids = probs.max(dim=-1)  # [layers, positions]
    assert len(found) == ids.numel()
    shown_ids = torch.zeros_like(ids)
    shown_probs = torch.zeros_like(best)
    for layer, position, token, prob in found:
        shown_ids[layer, position] = token
        shown_probs[layer, position] = prob
    assert torch.equal(shown_ids, ids)
    torch.testing.assert_close(shown_probs, best, rtol=1e-5, atol=1e-6)
    browser.save_screenshot(str(artifacts / "logit-lens.png"))

    with httpx.Client(base_url=server.url, headers=SIGNED) as http:
        assert http.post("/v1/logit_lens", json={"text": PROMPT, "top": 11}).status_code == 400
        assert http.post("/v1/logit_lens", json={"text": "the " * 65}).status_code == 413
        assert http.post("/v1/logit_lens", json={"text": PROMPT}, headers={"Authorization": ""}).status_code == 401


def test_top_examples_are_the_datasets_with_each_tokens_value_as_the_model_computes_it(
    signed_in, plain, acts, server, artifacts
):
    import neurotap as nt

    browser = signed_in
    model, _ = plain
    unit, k = 5, 4
    browser.find_element(By.CSS_SELECTOR, '#tabs button[data-view="examples"]').click()
    Select(browser.find_element(By.ID, "examples-point")).select_by_visible_text(MUL)
    fill(browser, **{"examples-unit": unit, "examples-k": k})
    browser.find_element(By.ID, "examples-run").click()
    wait_drawn(browser, "examples-list", "the examples")
    shown = browser.execute_script(
        "return Array.from(document.querySelectorAll('#examples-list .example')).map(e => ({"
        " row: Number(e.dataset.row), value: Number(e.dataset.value),"
        " pieces: Array.from(e.querySelectorAll('.example-token')).map(t => t.textContent),"
        " values: Array.from(e.querySelectorAll('.example-token')).map(t => Number(t.dataset.value)),"
        " peak: Array.from(e.querySelectorAll('.example-token')).findIndex(t => t.classList.contains('peak'))}))"
    )
    ds = nt.ActivationDataset(acts)
    expected = ds.top_examples(MUL, unit, k)
    assert [e["row"] for e in shown] == [e.row for e in expected]
    torch.testing.assert_close(torch.tensor([e["value"] for e in shown]), torch.tensor([e.value for e in expected]))

    # every shaded token's value: the plain model's MLP product on the example's sequence, by a hand hook
    for example, found in zip(expected, shown):
        begin = example.sequence * ds.seq_len
        ids = ds.read("tokens", begin, begin + ds.seq_len).long()[None]
        product = layer_0_mlp_product(model, ids)[0, :, unit]
        first = max(0, example.position - 16)
        window = product[first : example.position + 5]
        torch.testing.assert_close(torch.tensor(found["values"]), window, rtol=1e-5, atol=1e-6)
        assert found["peak"] == example.position - first
        # the pieces join into the dataset's text of those rows, spacing included; the peak is the example's token
        assert "".join(found["pieces"]) == ds.text(begin + first, begin + first + len(window))
        assert found["pieces"][found["peak"]].strip() == example.text.strip()
    browser.save_screenshot(str(artifacts / "examples.png"))

    with httpx.Client(base_url=server.url, headers=SIGNED) as http:
        assert http.get("/v1/dataset").json()["points"] == [MUL]
        for body, status in (
            ({"point": "../manifest.json", "unit": 0}, 404),  # a name, never a path
            ({"point": MUL, "unit": 10**6}, 400),
            ({"point": MUL, "unit": 0, "k": 10**6}, 400),
            ({"point": MUL, "unit": "0"}, 400),
        ):
            assert http.post("/v1/top_examples", json=body).status_code == status, body
        assert (
            http.post("/v1/top_examples", json={"point": MUL, "unit": 0}, headers={"Authorization": ""}).status_code
            == 401
        )


def test_the_patching_heat_map_is_each_residual_restored_from_the_clean_prompt(signed_in, plain, artifacts):
    browser = signed_in
    model, tokenizer = plain
    corrupt, target = "the new capital of france is paris", "river"
    browser.find_element(By.CSS_SELECTOR, '#tabs button[data-view="patching"]').click()
    fill(browser, corrupt=corrupt, target=target)
    browser.find_element(By.ID, "patching-run").click()
    wait_drawn(browser, "patching-map", "the patching heat map", target=str(tokenizer(target).input_ids[0]))
    shown_values = as_matrix(cells(browser, "#patching-map rect.cell"))
    browser.save_screenshot(str(artifacts / "patching.png"))

    # by hand: each decoder layer's output at one position put back from the clean run, with plain hooks
    layers = model.model.layers
    clean_ids, corrupt_ids = (torch.tensor([tokenizer(text).input_ids]) for text in (PROMPT, corrupt))
    expected = restored_probabilities(layers, model, clean_ids, corrupt_ids, tokenizer(target).input_ids[0])
    torch.testing.assert_close(shown_values, expected, rtol=1e-4, atol=1e-6)
