"""The playground page `mlx serve` shows at /: served offline with its assets, then driven in
headless chromium against a real server over a tiny model with an API key: a streamed chat with
no console errors, Enter / Shift+Enter, arena mode with an adapter loaded from the page at run
time (its answer equals the offline engine's), Stop aborting the request on the server, the
engine panel, a wrong API key shown in the page, and a 360 px wide screen."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from mlx_serve import LLM, SamplingParams
from mlx_serve.playground import STATIC_DIR
from mlx_serve.server import build_app
from tests.serve.browser import PageErrors, launch, save_screenshot
from tests.serve.helpers import LiveServer

MODEL, KEY, ADAPTER = "tiny-served", "test-key", "tiny-adapter"
SYSTEM = "be brief"


def _get(url: str, headers=None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.headers.get("content-type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read().decode()


def _metrics(url: str) -> dict[str, float]:
    status, _, text = _get(url + "/metrics")
    assert status == 200
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(mlx_serve_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer):
    """A tiny random model (peaked, so greedy text varies) and a random LoRA adapter for it."""
    from mlx_adapters import LoraConfig, get_peft_model
    from mlx_core import build_model, get_preset, save_model

    root = tmp_path_factory.mktemp("playground")
    torch.manual_seed(0)
    model = build_model(get_preset("tiny-llama"))
    model.reset_parameters(std=0.2)
    directory = save_model(model, root / "m", tokenizer=tiny_tokenizer)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    peft_model.save_pretrained(root / "adapter")
    return directory, root / "adapter"


@pytest.fixture(scope="module")
def served(model_dirs):
    directory, _ = model_dirs
    llm = LLM(directory, num_blocks=64, block_size=4, max_loras=2, max_lora_rank=8)
    app = build_app(llm.engine, MODEL, api_key=KEY, allow_runtime_lora=True)
    server = LiveServer(app)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


@pytest.fixture
def page(browser, served):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors = PageErrors(page)
    page.goto(f"{served.url}/#api_key={KEY}")
    page.wait_for_function("document.querySelector('.pane .model').options.length > 0")
    yield page, errors
    context.close()


def _offline_answer(directory, messages, max_tokens, lora_path=None) -> str:
    llm = LLM(directory, num_blocks=32, block_size=4, max_loras=1, max_lora_rank=8)
    if lora_path is not None:
        llm.add_lora(ADAPTER, lora_path)
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=max_tokens),
                   lora=ADAPTER if lora_path is not None else None)
    return out[0].outputs[0].text


def _set_sampling(page, max_tokens: int):
    page.fill("#system", SYSTEM)
    page.fill("#max-tokens", str(max_tokens))


def _answers(page, count: int, timeout_ms: int = 60_000) -> list[str]:
    page.wait_for_function(
        f"document.querySelectorAll('.msg.assistant[data-done]').length >= {count}",
        timeout=timeout_ms)
    return page.eval_on_selector_all(".msg.assistant .content", "els => els.map(e => e.textContent)")


# -- without a browser -----------------------------------------------------------------------
def test_page_and_assets_are_served_and_reference_nothing_outside(served):
    status, kind, html = _get(served.url + "/")
    assert status == 200 and kind.startswith("text/html") and "<title>mlx playground" in html
    for asset, kind_prefix in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        status, kind, _ = _get(f"{served.url}/playground/{asset}")
        assert status == 200 and kind.startswith(kind_prefix), (asset, kind)
    for path in STATIC_DIR.iterdir():  # offline: no CDN, no font or script from elsewhere
        assert not re.search(r"https?://|//cdn|@import", path.read_text()), path.name
    # the page itself needs no key (it asks for one); the API behind it does
    assert _get(served.url + "/v1/models")[0] == 401
    assert _get(f"{served.url}/playground/nothing.js")[0] == 404


def test_no_ui_leaves_the_root_unserved(model_dirs):
    directory, _ = model_dirs
    app = build_app(LLM(directory, num_blocks=16, block_size=4).engine, MODEL, ui=False)
    paths = {getattr(r, "path", None) for r in app.routes}
    assert "/" not in paths and "/playground" not in paths and "/v1/chat/completions" in paths


# -- in chromium -----------------------------------------------------------------------------
@pytest.mark.browser
def test_chat_streams_the_greedy_answer_with_no_console_errors(page, served, model_dirs, tmp_path):
    page, errors = page
    _set_sampling(page, max_tokens=12)
    # count the answer's updates: a streamed answer grows in several steps
    page.evaluate("""() => { window.updates = 0;
        new MutationObserver(() => window.updates++).observe(
            document.getElementById('panes'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#prompt", "hello there w3")
    page.keyboard.press("Shift+Enter")           # a new line, not a send
    page.keyboard.type("w5 w9")
    assert page.input_value("#prompt") == "hello there w3\nw5 w9"
    assert page.locator(".msg").count() == 0
    page.keyboard.press("Enter")                 # sends
    [answer] = _answers(page, 1)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "hello there w3\nw5 w9"}]
    assert answer == _offline_answer(model_dirs[0], messages, 12) and answer
    assert page.evaluate("window.updates") > 3
    stats = page.locator(".pane .stats")
    assert re.search(r"TTFT \d+ ms · [\d.]+ tok/s · 12 tokens · length", stats.text_content())
    assert page.input_value("#prompt") == "" and page.is_enabled("#send")
    # the next turn carries the history
    page.fill("#prompt", "w17")
    page.click("#send")
    assert len(_answers(page, 2)) == 2
    assert page.locator(".msg.user").count() == 2
    save_screenshot(page, tmp_path, "chat")
    assert errors.messages == []


@pytest.mark.browser
def test_arena_with_an_adapter_loaded_from_the_page(page, served, model_dirs, tmp_path):
    page, errors = page
    directory, adapter = model_dirs
    page.click("summary")
    page.fill("#lora-name", ADAPTER)
    page.fill("#lora-path", str(adapter))
    page.click("#load")
    page.wait_for_function(f"[...document.querySelector('.pane .model').options]"
                           f".some(o => o.value === '{ADAPTER}')")
    page.check("#arena")
    assert page.locator(".pane").count() == 2
    page.select_option(".pane[data-pane='0'] .model", MODEL)
    page.select_option(".pane[data-pane='1'] .model", ADAPTER)
    _set_sampling(page, max_tokens=10)
    page.fill("#prompt", "w20 w21")
    page.keyboard.press("Enter")
    base, tuned = _answers(page, 2)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "w20 w21"}]
    assert base == _offline_answer(directory, messages, 10)
    assert tuned == _offline_answer(directory, messages, 10, lora_path=adapter)
    assert base and tuned and base != tuned
    for i in (0, 1):
        assert re.search(r"TTFT \d+ ms", page.text_content(f".pane[data-pane='{i}'] .stats"))
    save_screenshot(page, tmp_path, "arena")
    # a wrong directory: the server's error shows in the page
    page.fill("#lora-name", "missing")
    page.fill("#lora-path", str(tmp_path / "no-such-adapter"))
    page.click("#load")
    page.wait_for_selector("#error:not([hidden])")
    assert "loading adapter 'missing' failed: 400" in page.text_content("#error")
    save_screenshot(page, tmp_path, "adapter-error")
    served.server.config.app.state.engine.engine.remove_lora(ADAPTER)  # leave the server as found
    assert [m for m in errors.messages if "400" not in m] == []  # the failed load's 400 only


@pytest.mark.browser
def test_stop_aborts_the_request_on_the_server(page, served, tmp_path, monkeypatch):
    page, errors = page
    engine = served.server.config.app.state.engine.engine
    step = engine.step

    def slow_step():  # a few tokens a second, so that Stop lands mid-answer
        time.sleep(0.05)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    aborted = _metrics(served.url).get('mlx_serve_requests_finished_total{finish_reason="abort"}', 0)
    _set_sampling(page, max_tokens=200)
    page.fill("#prompt", "w6 w7 w8 w9 w10")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('.pane .stats').dataset.tokens >= 3")
    assert _metrics(served.url)["mlx_serve_num_seqs_running"] == 1
    page.wait_for_function("document.getElementById('engine-running').textContent === '1'")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-done='stopped']")
    assert "stopped" in page.text_content(".pane .stats")
    deadline = time.monotonic() + 10
    while True:
        m = _metrics(served.url)
        if m["mlx_serve_num_seqs_running"] == 0 and \
                m.get('mlx_serve_requests_finished_total{finish_reason="abort"}', 0) > aborted:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert m["mlx_serve_kv_blocks_used"] == 0
    page.wait_for_function("document.getElementById('engine-running').textContent === '0'")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    save_screenshot(page, tmp_path, "stopped")
    # aborting a fetch is logged by no browser as an error
    assert errors.messages == []


@pytest.mark.browser
def test_engine_panel_shows_the_metrics(page, served):
    page, _ = page
    total = int(_metrics(served.url)["mlx_serve_kv_blocks_total"])
    page.wait_for_function(f"document.getElementById('engine-kv').textContent.endsWith('/ {total}')")
    for cell in ("engine-running", "engine-waiting"):
        assert re.fullmatch(r"\d+", page.text_content(f"#{cell}"))
    assert re.fullmatch(r"\d+%", page.text_content("#engine-prefix"))
    assert re.fullmatch(r"[\d.]+ tok/s", page.text_content("#engine-throughput"))


@pytest.mark.browser
def test_a_wrong_api_key_shows_the_servers_error(page, tmp_path):
    page, _ = page
    page.fill("#api-key", "wrong-key")
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#error:not([hidden])")
    assert "401: invalid or missing API key" in page.text_content("#error")
    page.fill("#prompt", "w3")
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.assistant.failed")
    assert "invalid or missing API key" in page.text_content(".msg.assistant.failed")
    save_screenshot(page, tmp_path, "wrong-key")
    page.fill("#api-key", KEY)                   # the key is remembered: put the right one back
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#error", state="hidden")


@pytest.mark.browser
def test_readable_on_a_360_px_screen(browser, served, tmp_path):
    context = browser.new_context(viewport={"width": 360, "height": 740})
    page = context.new_page()
    errors = PageErrors(page)
    page.goto(f"{served.url}/#api_key={KEY}")
    page.wait_for_function("document.querySelector('.pane .model').options.length > 0")
    page.check("#arena")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # no sideways scrolling
    for selector in ("#prompt", "#send", "#stop", ".pane[data-pane='1']"):
        box = page.locator(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 360, selector
    panes = [page.locator(f".pane[data-pane='{i}']").bounding_box() for i in (0, 1)]
    assert panes[1]["y"] > panes[0]["y"] + panes[0]["height"] - 1   # stacked, not squeezed
    assert all(p["width"] >= 320 for p in panes)                     # and using the width
    save_screenshot(page, tmp_path, "narrow")
    assert errors.messages == []
    context.close()


def test_mlx_playground_starts_the_server_and_opens_the_page_with_the_key(model_dirs, tmp_path):
    """`mlx playground DIR --lora NAME=DIR --api-key KEY` serves the page with the adapter,
    allows loading more at run time, and hands the browser the URL with the key in its
    #fragment ($BROWSER stands in for the user's browser)."""
    directory, adapter = model_dirs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opened = tmp_path / "opened.txt"
    env = {**os.environ, "BROWSER": f"{sys.executable} -c \"import sys; open('{opened}', 'w')"
                                     f".write(sys.argv[1])\" %s"}
    mlx = Path(sys.executable).parent / "mlx"
    proc = subprocess.Popen([str(mlx), "playground", str(directory), "--lora", f"{ADAPTER}={adapter}",
                             "--port", str(port), "--api-key", KEY], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not opened.exists() or not opened.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        assert opened.read_text() == f"{url}/#api_key={KEY}"
        assert _get(url + "/")[0] == 200
        auth = {"Authorization": f"Bearer {KEY}"}
        status, _, body = _get(url + "/v1/models", auth)
        assert status == 200 and ADAPTER in body
        request = urllib.request.Request(
            url + "/v1/load_lora_adapter", method="POST", headers={**auth, "Content-Type":
                                                                   "application/json"},
            data=b'{"lora_name": "other", "lora_path": "/no/such/dir"}')
        with pytest.raises(urllib.error.HTTPError) as refused:  # the route exists: 400, not 404
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    assert f"playground: http://127.0.0.1:{port}/" in output and proc.returncode in (0, 130)
