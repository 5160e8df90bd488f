"""The playground against a real `mlx serve` (a subprocess, as a user starts it) on the built-in
model with a LoRA adapter trained on the quickstart's code-book task, in headless chromium:
arena mode shows the base's and the adapter's different answers to a held-out code-book prompt
(the adapter's equals the offline `LLM`'s greedy answer), Stop aborts the request on the server
(its running count drops to 0, no KV block stays held), a wrong API key shows the server's error.

Screenshots land in each test's tmp dir; with MLX_PLAYGROUND_SCREENSHOTS=DIR they are copied to
DIR too (docs/serve.md's picture: MLX_PLAYGROUND_SCREENSHOTS=docs/images python -m pytest
tests/integration/test_playground_builtin.py)."""

import os
import re
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mlx_core.sources import BUILTIN_MODEL
from tests.serve.browser import PageErrors, launch, save_screenshot
from tests.serve.process import running_mlx_serve

pytestmark = [pytest.mark.builtin_model, pytest.mark.slow, pytest.mark.browser]

KEY, ADAPTER = "playground-key", "code-book"
SCREENSHOTS = os.environ.get("MLX_PLAYGROUND_SCREENSHOTS")


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(mlx_serve_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


@pytest.fixture(scope="module")
def code_adapter(tmp_path_factory):
    """The quickstart's LoRA run (`mlx quickstart --quick`'s recipe overrides) without its
    before/after scoring: an adapter that has learned some of the code book."""
    from mlx_train import recipes
    from mlx_train.quickstart import QUICK_STEPS, overrides

    out = tmp_path_factory.mktemp("quickstart") / "run"
    recipes.run("lora_finetune", overrides(QUICK_STEPS, out, True, BUILTIN_MODEL)
                + ["eval.before=false", "eval.exact_match=false", "eval.samples=0"])
    return out / "adapter"


@pytest.fixture(scope="module")
def server(code_adapter, tmp_path_factory):
    mlx = Path(sys.executable).parent / "mlx"
    with running_mlx_serve(mlx, ["--api-key", KEY, "--lora", f"{ADAPTER}={code_adapter}",
                                 "--kv-cache-memory", "512MiB", "--log-level", "warning"],
                           tmp_path_factory.mktemp("serve") / "serve.log", timeout=300,
                           poll=0.5) as url:
        yield url


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        errors = PageErrors(page)
        page.goto(f"{server}/#api_key={KEY}")
        page.wait_for_function("document.querySelector('.pane .model').options.length > 1")
        yield page, errors
        browser.close()


def test_arena_shows_the_base_and_the_code_book_adapter_side_by_side(page, code_adapter,
                                                                        tmp_path):
    from mlx_serve import LLM, SamplingParams
    from mlx_train.recipes.tasks import SYSTEM, secret_code_items

    page, errors = page
    held_out = secret_code_items(0, 8)[1][0]     # a combination no training item has
    page.fill("#system", SYSTEM)
    page.fill("#max-tokens", "12")
    page.check("#arena")
    page.select_option(".pane[data-pane='0'] .model", BUILTIN_MODEL)
    page.select_option(".pane[data-pane='1'] .model", ADAPTER)
    page.evaluate("""() => { window.updates = 0;
        new MutationObserver(() => window.updates++).observe(
            document.getElementById('panes'), {subtree: true, characterData: true, childList: true}); }""")
    page.fill("#prompt", held_out["instruction"])
    save_screenshot(page, tmp_path, "playground-loaded", also_to=SCREENSHOTS)
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-done]').length >= 2",
                           timeout=300_000)
    base, tuned = page.eval_on_selector_all(".msg.assistant .content",
                                            "els => els.map(e => e.textContent)")
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": held_out["instruction"]}]
    llm = LLM(BUILTIN_MODEL, loras={ADAPTER: str(code_adapter)}, kv_cache_memory="256MiB")
    greedy = SamplingParams(temperature=0, max_tokens=12)
    offline_base = llm.chat(messages, greedy)[0].outputs[0].text
    offline_tuned = llm.chat(messages, greedy, lora=ADAPTER)[0].outputs[0].text
    print(f"held out {held_out['instruction']!r} (reference {held_out['output']!r}): base "
          f"{base!r}, adapter {tuned!r}")
    assert tuned == offline_tuned and base == offline_base
    assert base != tuned
    assert page.evaluate("window.updates") > 4  # streamed, not shown at once
    for i in (0, 1):
        assert re.search(r"TTFT \d+ ms · [\d.]+ tok/s · \d+ tokens",
                         page.text_content(f".pane[data-pane='{i}'] .stats"))
    save_screenshot(page, tmp_path, "playground-arena", also_to=SCREENSHOTS)
    assert errors.messages == []


def test_stop_aborts_on_the_server_and_a_wrong_key_shows_its_error(page, server, tmp_path):
    page, errors = page
    finished = 'mlx_serve_requests_finished_total{finish_reason="abort"}'
    aborted = _metrics(server).get(finished, 0)
    page.fill("#max-tokens", "400")
    page.fill("#prompt", "Write a long story about a lighthouse keeper and a storm.")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('.pane .stats').dataset.tokens >= 4",
                           timeout=120_000)
    assert _metrics(server)["mlx_serve_num_seqs_running"] == 1
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-done='stopped']")
    deadline = time.monotonic() + 15
    while True:
        m = _metrics(server)
        if m["mlx_serve_num_seqs_running"] == 0 and m.get(finished, 0) > aborted:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    assert m["mlx_serve_kv_blocks_used"] == 0
    page.wait_for_function("document.getElementById('engine-running').textContent === '0'")
    save_screenshot(page, tmp_path, "playground-stopped", also_to=SCREENSHOTS)
    assert errors.messages == []

    page.fill("#api-key", "not-the-key")
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#error:not([hidden])")
    assert "401: invalid or missing API key" in page.text_content("#error")
    save_screenshot(page, tmp_path, "playground-wrong-key", also_to=SCREENSHOTS)
