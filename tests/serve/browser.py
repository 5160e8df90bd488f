"""Headless Debian chromium driven by Playwright, for the playground's browser tests: launched
with the flags that keep it off the network, every console error and page error recorded."""

import shutil
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def launch(playwright):
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: the browser tests drive Debian's chromium "
                           "(apt-get update && apt-get install -y chromium; .ci/run installs it)")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)


class PageErrors:
    """Console errors and uncaught exceptions of ``page`` (a test asserts there are none)."""

    def __init__(self, page):
        self.messages: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.messages.append(m.text))
        page.on("pageerror", lambda e: self.messages.append(str(e)))


def save_screenshot(page, tmp_path: Path, name: str, also_to: str | None = None) -> Path:
    """``tmp_path/name.png``; copied into ``also_to`` too when given (the docs' picture)."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if also_to:
        Path(also_to).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(also_to) / path.name)
    return path
