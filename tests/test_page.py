"""The page at `/`, in a real browser: Debian's Chromium driven by Playwright."""

from __future__ import annotations

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from bench.cluster import chromium_options


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(**chromium_options())
        yield browser
        browser.close()


def answer_length(page: Page) -> int:
    return int(page.evaluate("document.getElementById('answer').textContent.length"))


def test_page_streams_an_answer_and_stops_it(
    browser: Browser, make_service, slow_model_dir, tmp_path
):
    svc = make_service(model=slow_model_dir)
    page = browser.new_page()
    page.goto(svc.base + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('slow-gpt2')")
    assert page.is_hidden("#key-label")  # the API is open: no key field

    page.fill("#prompt", "Once upon a time")
    page.fill("#max_tokens", "800")
    page.click("#send")
    page.wait_for_function(
        "document.getElementById('answer').textContent.length > 20", timeout=30_000
    )
    first = answer_length(page)
    page.wait_for_function(f"document.getElementById('answer').textContent.length > {first + 20}")
    assert page.text_content("#status") == "generating"
    assert page.text_content("#ttft").endswith(" ms")
    assert float(page.text_content("#rate")) > 0
    page.screenshot(path=str(tmp_path / "page.png"))

    page.click("#stop")
    page.wait_for_function(
        "document.getElementById('status').textContent === 'stopped'", timeout=10_000
    )
    stopped_at = answer_length(page)
    page.wait_for_timeout(1000)
    assert answer_length(page) == stopped_at  # the stream really ended
    assert page.is_enabled("#send") and page.is_disabled("#stop")


def test_page_fits_a_phone_width_window(browser: Browser, service):
    page = browser.new_page(viewport={"width": 375, "height": 740})
    page.goto(service.base + "/")
    overflow = page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0
    send, stop = page.locator("#send").bounding_box(), page.locator("#stop").bounding_box()
    assert send and stop and send["x"] + send["width"] <= 375 and stop["x"] + stop["width"] <= 375


def test_page_works_with_an_api_key(browser: Browser, make_service):
    svc = make_service(API_KEYS="s3cret-key")
    page = browser.new_page()
    page.goto(svc.base + "/")
    page.wait_for_selector("#key-label", state="visible")

    page.fill("#prompt", "The capital of France is")
    page.click("#send")
    page.wait_for_function("document.getElementById('status').className === 'error'")
    assert "API key" in page.text_content("#status")

    page.fill("#key", "s3cret-key")
    page.click("#send")
    page.wait_for_function(
        "document.getElementById('status').textContent.startsWith('done')", timeout=30_000
    )
    assert page.text_content("#answer").startswith(" Paris.")
