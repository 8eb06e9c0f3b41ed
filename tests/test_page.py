"""The chat page at `/`, in a real browser: Debian's Chromium driven by Playwright.

Two services serve the whole module: a tiny GPT-2 trained on a few chat turns (so
that its answers are known: markdown, a code block, raw HTML), behind an API key;
and the fake engine (a fixed text at a set rate: long answers to stop, reload or
cut mid-way), open. A relay in front of the fake service drops a stream mid-answer.
What no service sends yet (a `thinking` event, several models) is answered with
Playwright's routing.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from helpers import service_env, serving, start_api, start_workers, wait_for_workers
from playwright.sync_api import Browser, BrowserContext, Page, Route, sync_playwright
from tiny_models import build_tiny_gpt2

from bench.cluster import chromium_options

KEY = "s3cret-key"


def layout(*turns: str) -> str:
    """The prompt the worker builds for GPT-2 (no chat template of its own): one
    `Role: content` line per message, then `Assistant:` (DEFAULT_CHAT_TEMPLATE)."""
    roles = ("User", "Assistant")
    return "".join(f"{roles[i % 2]}: {turn}\n" for i, turn in enumerate(turns)) + "Assistant:"


FRANCE, PARIS = "Capital of France?", "**Paris**."
GERMANY, BERLIN = "And of Germany?", "**Berlin**."
CODE, CODE_LINE = "Some code?", "print('" + "-" * 96 + "')"
HTML = "Some HTML?"
HTML_ANSWER = "<script>x=1</script><img src=x onerror=x=2>"

#: What the page's tiny model learns (the page sends no system prompt by default).
#: The second turn starts with the first one, which there goes on with "\n" where
#: alone it ends: the first turn is taught twice (the same token sequence under two
#: keys) so that greedy decoding ends it.
LESSONS = {
    layout(FRANCE): " " + PARIS,
    layout(FRANCE) + " **": PARIS.removeprefix("**"),
    layout(FRANCE, PARIS, GERMANY): " " + BERLIN,
    layout(CODE): f" ```python\n{CODE_LINE}\n```",
    layout(HTML): " " + HTML_ANSWER,
}


@contextmanager
def running_service(workdir: Path, redis_url: str, model: str, **env: str) -> Iterator[str]:
    """One API and one worker on a Redis database of this module's own."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    settings = service_env(redis_url, model, **env)
    workers = start_workers(settings, workdir)
    api, base = start_api(settings, workdir)
    try:
        wait_for_workers(base, 1, proc=workers)
        yield base
    finally:
        workers.stop()
        api.stop()
        client.flushdb()
        client.close()


def database(redis_url: str, number: int) -> str:
    return f"{redis_url.rsplit('/', 1)[0]}/{number}"


@pytest.fixture(scope="module")
def chat_base(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("models") / "chat-gpt2"
    model = build_tiny_gpt2(path, steps=120, trained=LESSONS)
    workdir = tmp_path_factory.mktemp("chat-svc")
    db = database(redis_url, 14)
    with running_service(workdir, db, str(model), API_KEYS=KEY) as base:
        yield base


@pytest.fixture(scope="module")
def fake_base(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("fake-svc")
    with running_service(workdir, database(redis_url, 13), "fake:25") as base:
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(**chromium_options())
        yield browser
        browser.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh profile (empty localStorage) per test."""
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    yield context
    context.close()


@pytest.fixture
def chat(context: BrowserContext, chat_base: str) -> Page:
    """The page on the key-protected chat service, with the key already entered."""
    context.add_init_script(f"sessionStorage.setItem('textstream-key', {json.dumps(KEY)})")
    page = context.new_page()
    open_page(page, chat_base, "chat-gpt2")
    return page


def wait_for(page: Page, expression: str, timeout_s: float = 30) -> None:
    """`page.wait_for_function` runs its string through eval, which the page's CSP
    refuses (no 'unsafe-eval'): poll with `evaluate` (DevTools, outside the CSP)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"still false after {timeout_s} s: {expression}"
        page.wait_for_timeout(50)


def open_page(page: Page, base: str, model: str) -> None:
    page.goto(base + "/")
    wait_for(page, f"document.getElementById('model').textContent.includes({model!r})")


def finished_answers(page: Page) -> int:
    return int(page.evaluate("document.querySelectorAll('.msg.assistant:not(.streaming)').length"))


def ask(page: Page, text: str) -> str:
    """Send `text`, wait for the answer to end, return its text as shown."""
    before = finished_answers(page)
    page.fill("#prompt", text)
    page.click("#send")
    wait_for(page, f"document.querySelectorAll('.msg.assistant:not(.streaming)').length > {before}")
    return answer(page, -1).text_content() or ""


def answer(page: Page, index: int) -> Any:
    return page.locator(".msg.assistant .answer").nth(index)


def set_max_tokens(page: Page, value: int) -> None:
    page.click("#settings-toggle")
    page.fill("#max_tokens", str(value))
    page.click("#settings-toggle")


def is_job_post(request: Any) -> bool:
    return bool(request.method == "POST" and request.url.endswith("/jobs"))


# -- conversations --------------------------------------------------------------------


def test_a_second_turn_carries_the_first_and_its_answer(chat: Page):
    with chat.expect_request(is_job_post) as first:
        assert ask(chat, FRANCE) == "Paris."
    assert first.value.post_data_json["messages"] == [{"role": "user", "content": FRANCE}]
    assert chat.text_content("#status") == "done"  # words, not finish_reason
    assert chat.text_content("#ttft").endswith(" ms")  # type: ignore[union-attr]
    assert answer(chat, 0).locator("strong").text_content() == "Paris"  # markdown, rendered

    with chat.expect_request(is_job_post) as second:
        assert ask(chat, GERMANY) == "Berlin."
    body = second.value.post_data_json
    assert body["messages"] == [
        {"role": "user", "content": FRANCE},
        {"role": "assistant", "content": PARIS},
        {"role": "user", "content": GERMANY},
    ]
    assert "model" not in body  # one model: the API takes no `model` field
    assert body["temperature"] == 0 and body["top_p"] == 1
    assert chat.locator(".msg.user").all_text_contents() == [FRANCE, GERMANY]
    assert "chat-gpt2" in (chat.locator(".msg.assistant .msg-stats").nth(1).text_content() or "")


def job_id_of_last_answer(page: Page) -> str:
    chats = page.evaluate("JSON.parse(localStorage.getItem('textstream-chats'))")
    return str(chats[0]["messages"][-1]["job"]["id"])


def test_regenerate_asks_for_a_new_answer_not_the_cached_one(chat: Page):
    ask(chat, FRANCE)
    wait_for(chat, "document.getElementById('status').textContent === 'done'")
    first_job = job_id_of_last_answer(chat)
    with chat.expect_request(is_job_post) as again:
        # (The status says "regenerating: a new answer at …" until the first token,
        # too briefly to read reliably; the stats line below keeps saying it.)
        chat.click(".msg.assistant .regenerate")
        wait_for(chat, "document.getElementById('status').textContent === 'done'")
    body = again.value.post_data_json
    assert body["messages"] == [{"role": "user", "content": FRANCE}]
    # Past the cache, with a new seed; temperature 0 (the page's default) would
    # give the same answer again, so it asks at 0.7.
    assert body["use_cache"] is False and isinstance(body["seed"], int)
    assert body["temperature"] == 0.7
    assert job_id_of_last_answer(chat) != first_job  # a new job, not the cached one
    assert chat.locator(".msg.assistant").count() == 1
    stats = chat.text_content(".msg.assistant .msg-stats") or ""
    assert "new answer at temperature 0.7" in stats

    # Copy gives the whole answer as the model wrote it (sampled at 0.7, it need not
    # be PARIS: the tiny model may go on past it), not the rendered text.
    written = chat.evaluate(
        "JSON.parse(localStorage.getItem('textstream-chats'))[0].messages.at(-1).content"
    )
    assert written.strip()
    chat.click(".msg.assistant .copy")
    assert chat.evaluate("navigator.clipboard.readText()") == written.strip()


def test_a_code_block_is_rendered_as_pre_code_with_a_copy_button(chat: Page):
    ask(chat, CODE)
    code = answer(chat, -1).locator("pre > code")
    assert code.text_content() == CODE_LINE
    assert code.get_attribute("class") == "language-python"
    assert code.evaluate("c => getComputedStyle(c).fontFamily").lower().find("mono") >= 0
    chat.click(".copy-code")
    assert chat.evaluate("navigator.clipboard.readText()") == CODE_LINE


def test_html_in_an_answer_is_shown_as_text_and_never_run(chat: Page):
    shown = ask(chat, HTML)
    assert shown == HTML_ANSWER
    reply = answer(chat, -1)
    assert reply.locator("img, script").count() == 0
    assert chat.evaluate("typeof window.x") == "undefined"
    assert chat.title() == "textstream"
    chat.reload()  # and drawn again from localStorage, still as text
    chat.wait_for_selector(".msg.assistant .answer")
    assert answer(chat, -1).text_content() == HTML_ANSWER
    assert chat.evaluate("typeof window.x") == "undefined"


def test_markdown_is_built_as_elements_with_safe_links(fake_base: str, context: BrowserContext):
    page = context.new_page()
    page.goto(fake_base + "/")
    source = (
        "# Title\n\nSome *em*, **strong**, `x < y` and [a link](https://example.com/a).\n"
        "[bad](javascript:alert(1)) and [data](data:text/html,hi) stay text.\n\n"
        "- one\n- two\n  1. nested\n\n```\n<b>not bold</b>\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |"
    )
    html = page.evaluate(
        "s => { const d = document.createElement('div'); d.append(textstream.markdown(s));"
        " return d.innerHTML; }",
        source,
    )
    assert html.startswith("<h1>Title</h1><p>Some <em>em</em>, <strong>strong</strong>")
    assert "<code>x &lt; y</code>" in html
    assert (
        '<a href="https://example.com/a" target="_blank" rel="noopener noreferrer nofollow">'
        in html
    )
    assert html.count("<a ") == 1
    assert "[bad](javascript:alert(1)) and [data](data:text/html,hi) stay text." in html
    assert "<ul><li><p>one</p></li><li><p>two</p><ol><li><p>nested</p></li></ol></li></ul>" in html
    assert "<pre><code>&lt;b&gt;not bold&lt;/b&gt;</code></pre>" in html
    assert "<th>a</th><th>b</th>" in html and "<td>1</td><td>2</td>" in html


# -- chats kept in the browser -----------------------------------------------------------


def test_reload_keeps_the_chat_and_new_chat_starts_an_empty_one(chat: Page):
    ask(chat, FRANCE)
    chat.reload()
    chat.wait_for_selector(".msg.assistant .answer strong")
    assert chat.locator(".msg.user").all_text_contents() == [FRANCE]
    assert answer(chat, 0).text_content() == "Paris."
    assert chat.text_content("#chat-title") == FRANCE

    chat.click("#new-chat")
    assert chat.locator(".msg").count() == 0 and chat.is_visible("#empty")
    assert chat.locator("#chats li").count() == 2
    assert chat.locator("#chats li.current").text_content() == "New chat×"
    chat.reload()  # the new, empty chat is the current one after a reload too
    chat.wait_for_selector("#chats li")
    assert chat.locator(".msg").count() == 0 and chat.locator("#chats li").count() == 2

    chat.click(f"#chats li .open[title='{FRANCE}']")
    assert answer(chat, 0).text_content() == "Paris."
    chat.click("#chats li.current .delete")
    assert chat.locator("#chats li").count() == 1 and chat.locator(".msg").count() == 0


# -- streams: stop, resume ---------------------------------------------------------------


def test_stop_ends_a_running_answer(fake_base: str, context: BrowserContext):
    page = context.new_page()
    open_page(page, fake_base, "fake")
    assert page.is_hidden("#key-label")  # the API is open: no key field
    set_max_tokens(page, 400)
    page.fill("#prompt", "Tell me a long story")
    page.click("#send")
    wait_for(
        page, "(document.querySelector('.msg.assistant .answer')?.textContent.length ?? 0) > 30"
    )
    assert page.text_content("#status") == "generating"
    assert float(page.text_content("#rate") or 0) > 0
    page.click("#stop")
    wait_for(page, "document.getElementById('status').textContent === 'stopped'")
    stopped_at = len(answer(page, 0).text_content() or "")
    page.wait_for_timeout(600)
    assert len(answer(page, 0).text_content() or "") == stopped_at  # the stream really ended
    assert page.text_content(".msg.assistant .note") == "Stopped."
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    stats = page.text_content(".msg.assistant .msg-stats") or ""
    # A stopped answer keeps all its figures, not only the time to first token.
    assert "tokens ·" in stats and "ms to first token" in stats and "tokens/s" in stats


def test_the_figures_do_not_move_when_an_answer_ends(fake_base: str, context: BrowserContext):
    page = context.new_page()
    open_page(page, fake_base, "fake")
    set_max_tokens(page, 40)
    page.fill("#prompt", "Tell me a story")
    page.click("#send")
    wait_for(
        page, "(document.querySelector('.msg.assistant .answer')?.textContent.length ?? 0) > 5"
    )
    left = "document.querySelector('.msg.assistant .msg-stats').getBoundingClientRect().left"
    answer_left = "document.querySelector('.msg.assistant .answer').getBoundingClientRect().left"
    streaming = page.evaluate(left)
    assert streaming == page.evaluate(answer_left)  # not indented by hidden buttons
    wait_for(page, "document.getElementById('status').textContent.startsWith('done')")
    assert page.evaluate(left) == streaming
    assert page.text_content("#status") == "done: cut at max tokens (raise it in Settings)"


def test_a_code_block_cut_before_its_first_line_draws_no_empty_block(
    context: BrowserContext, fake_base: str
):
    page = context.new_page()
    open_page(page, fake_base, "fake")
    done = {"finish_reason": "length", "usage": {"completion_tokens": 3}, "model": "fake"}
    canned_job(
        page,
        sse(
            ("1-0", "token", {"text": "Here it is:\n\n"}),
            ("1-1", "token", {"text": "```python\n"}),
            ("1-2", "done", done),
        ),
    )
    page.fill("#prompt", "Code?")
    page.click("#send")
    wait_for(page, "document.getElementById('status').textContent.startsWith('done')")
    assert page.locator(".msg.assistant .codeblock").count() == 0
    assert answer(page, 0).text_content() == "Here it is:"


def test_a_reload_mid_answer_resumes_without_repeating_text(
    fake_base: str, context: BrowserContext
):
    page = context.new_page()
    open_page(page, fake_base, "fake")
    set_max_tokens(page, 60)
    page.fill("#prompt", "Tell me a story")
    page.click("#send")
    wait_for(
        page, "(document.querySelector('.msg.assistant .answer')?.textContent.length ?? 0) > 30"
    )
    partial = len(answer(page, 0).text_content() or "")
    page.reload()
    wait_for(page, "document.getElementById('status').textContent.startsWith('done')")
    stored = page.evaluate("JSON.parse(localStorage.getItem('textstream-chats'))")
    reply = stored[0]["messages"][1]
    job = httpx.get(f"{fake_base}/jobs/{reply['job']['id']}").json()
    assert job["status"] == "done" and reply["stats"]["tokens"] == 60
    assert reply["content"] == job["text"]  # every piece once, in order
    assert answer(page, 0).text_content() == job["text"].strip()
    assert partial < len(job["text"].strip())  # the reload came mid-answer


def sse(*events: tuple[str, str, dict[str, Any]]) -> str:
    return "".join(
        f"id: {eid}\nevent: {name}\ndata: {json.dumps(data)}\n\n" for eid, name, data in events
    )


def canned_job(page: Page, stream: str) -> None:
    """POST /jobs and its event stream answered by the test, with `stream`."""

    def create(route: Route) -> None:
        reply = {"id": "a" * 32, "events_url": "/jobs/canned/events"}
        route.fulfill(
            status=202, json={**reply, "status_url": "/jobs/canned", "events_token": None}
        )

    def events(route: Route) -> None:
        route.fulfill(status=200, body=stream, headers={"Content-Type": "text/event-stream"})

    page.route("**/jobs", create)
    page.route("**/jobs/canned/events*", events)


class CuttingRelay:
    """A relay between the page and the API's event stream, on a port of its own:
    it ends the first connection after `cut_after` token events (as a dropped
    network would), and when the browser reconnects it asks the API to resume one
    event earlier than the browser's Last-Event-ID, so that one event comes twice."""

    def __init__(self, api_base: str, cut_after: int) -> None:
        self.api_base, self.cut_after = api_base, cut_after
        self.last_event_ids: list[str | None] = []  # as each connection arrived
        self.sent_ids: list[str] = []
        self.cut_at = ""  # the last id the first connection carried
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the response ends when the socket closes

            def do_GET(self) -> None:
                relay.relay(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def relay(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        asked = handler.headers.get("Last-Event-ID")
        self.last_event_ids.append(asked)
        first = len(self.last_event_ids) == 1
        headers = {}
        if asked:
            headers["Last-Event-ID"] = self.sent_ids[self.sent_ids.index(asked) - 1]
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Access-Control-Allow-Origin", "*")
        handler.end_headers()
        handler.wfile.write(b"retry: 100\n\n")
        tokens = 0
        url = self.api_base + handler.path
        with httpx.stream("GET", url, headers=headers, timeout=30) as response:
            for line in response.iter_lines():
                handler.wfile.write(line.encode() + b"\n")
                handler.wfile.flush()
                if line.startswith("id: "):
                    self.sent_ids.append(line[4:])
                tokens += line == "event: token"
                if first and line == "" and tokens >= self.cut_after:
                    self.cut_at = self.sent_ids[-1]
                    return  # drop the connection mid-answer

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_dropped_stream_resumes_from_the_last_event_without_duplicates(
    fake_base: str, browser: Browser
):
    relay = CuttingRelay(fake_base, cut_after=5)
    # The relay is another origin, which the page's CSP (connect-src 'self') refuses.
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()

    def create(route: Route) -> None:  # the real job, followed through the relay
        response = route.fetch()
        reply = response.json()
        route.fulfill(
            response=response, json={**reply, "events_url": relay.base + reply["events_url"]}
        )

    page.route("**/jobs", create)
    open_page(page, fake_base, "fake")
    set_max_tokens(page, 20)
    try:
        shown = ask(page, "Tell me a story")
    finally:
        relay.close()
    stored = page.evaluate("JSON.parse(localStorage.getItem('textstream-chats'))")
    context.close()
    reply = stored[0]["messages"][1]
    job = httpx.get(f"{fake_base}/jobs/{reply['job']['id']}").json()
    assert len(relay.last_event_ids) == 2 and relay.last_event_ids[0] is None
    assert relay.last_event_ids[1] == relay.cut_at  # the browser said where it was
    assert reply["content"] == job["text"]  # the replayed token was dropped
    assert shown == job["text"].strip() and reply["stats"]["tokens"] == 20


def test_thinking_is_shown_folded_above_the_answer(fake_base: str, context: BrowserContext):
    page = context.new_page()
    open_page(page, fake_base, "fake")
    done = {"finish_reason": "stop", "model": "m", "usage": {"completion_tokens": 3}}
    stream = sse(
        ("1-0", "thinking", {"text": "The user greets me."}),
        ("1-1", "token", {"text": " Hi"}),
        ("1-2", "done", done),
    )
    canned_job(page, stream)
    ask(page, "Hi")
    thinking = page.locator(".msg.assistant details.thinking")
    assert thinking.is_visible() and thinking.get_attribute("open") is None
    assert page.text_content(".thinking-body") == "The user greets me."
    assert answer(page, 0).text_content() == "Hi"


def test_several_models_bring_a_picker_and_a_model_field(fake_base: str, context: BrowserContext):
    page = context.new_page()
    health = {"status": "ok", "model": ["m1", "m2"], "models": ["m1", "m2"], "auth": False}
    page.route("**/health", lambda route: route.fulfill(json=health))
    canned_job(page, sse(("1-0", "done", {"finish_reason": "stop", "model": "m2"})))
    page.goto(fake_base + "/")
    page.wait_for_selector("#model-picker", state="visible")
    page.select_option("#model-picker", "m2")
    with page.expect_request(is_job_post) as posted:
        ask(page, "Hi")
    assert posted.value.post_data_json["model"] == "m2"


# -- phone, keys ----------------------------------------------------------------------------


def test_the_page_fits_a_phone_width_window(chat_base: str, browser: Browser):
    context = browser.new_context(viewport={"width": 375, "height": 740})
    context.add_init_script(f"sessionStorage.setItem('textstream-key', {json.dumps(KEY)})")
    page = context.new_page()
    open_page(page, chat_base, "chat-gpt2")
    ask(page, CODE)  # a code line far wider than the phone
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    pre = page.locator("pre").first
    assert pre.evaluate("p => p.scrollWidth > p.clientWidth")  # it scrolls inside itself
    for selector in ("#send", "#stop", "#prompt", "#settings-toggle", "#open-sidebar"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, selector
    page.click("#open-sidebar")
    page.wait_for_selector("#new-chat", state="visible")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.click("#new-chat")
    page.wait_for_selector("#new-chat", state="hidden")  # the list closes again
    assert page.locator(".msg").count() == 0
    # The header cuts neither the title nor the model short: each has its own line.
    page.evaluate("document.getElementById('chat-title').textContent = 'A chat about capitals'")
    for selector in ("#chat-title", "#model"):
        assert page.locator(selector).evaluate("e => e.scrollWidth <= e.clientWidth"), selector
    context.close()


def test_a_key_protected_server_works_once_the_key_is_entered(
    chat_base: str, context: BrowserContext
):
    page = context.new_page()
    open_page(page, chat_base, "chat-gpt2")
    page.wait_for_selector("#key-label", state="visible")

    page.fill("#prompt", FRANCE)
    page.click("#send")
    wait_for(page, "document.getElementById('status').className === 'error'")
    assert "API key" in (page.text_content("#status") or "")
    assert page.input_value("#prompt") == FRANCE  # nothing was queued: the turn comes back
    assert page.locator(".msg").count() == 0

    page.fill("#key", KEY)
    page.click("#send")
    wait_for(page, "document.getElementById('status').textContent === 'done'")
    assert answer(page, 0).text_content() == "Paris."
    page.reload()  # the key is kept for the tab
    page.wait_for_selector(".msg.assistant")
    assert page.input_value("#key") == KEY


# -- answers that would take the page down; headers ------------------------------------


def stored_chat(*answers: str) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    for n, content in enumerate(answers):
        messages.append({"role": "user", "content": f"Question {n}"})
        messages.append({"role": "assistant", "content": content, "status": "done", "stats": {}})
    return {"id": "stored", "system": "", "created": 1, "updated": 1, "messages": messages}


def open_with_stored_chat(page: Page, base: str, chat: dict[str, Any], drawing: bool) -> None:
    """The page opened with `chat` stored as the current one (written once, before
    the page's script runs); `drawing`: as if the last visit died drawing it."""
    seed = [
        f"localStorage.setItem('textstream-chats', {json.dumps(json.dumps([chat]))});",
        f"localStorage.setItem('textstream-current', {json.dumps(chat['id'])});",
    ]
    if drawing:
        seed.append(f"localStorage.setItem('textstream-drawing', {json.dumps(chat['id'])});")
    page.context.add_init_script(
        "if (!sessionStorage.getItem('seeded')) {"
        f" sessionStorage.setItem('seeded', '1'); {' '.join(seed)} }}"
    )
    page.goto(base + "/")


#: Each took the old renderer down: 3,500 nested blockquotes crash Chromium's
#: renderer; the others were quadratic (a lazy regex rescanning the line or the
#: text for every opener) or built one element per row without end.
PATHOLOGICAL = {
    "quotes": ">" * 3500,
    "lists": "- " * 3000 + "deep",
    "table": "| a | b | c |\n|---|---|---|\n" + "| 1 | 2 | 3 |\n" * 20000,
    "emphasis": "**a " * 25000,
    "fence": "``` " + "a" * 100000 + "`",
    "code": "` " + "a" * 100000 + "`",
}


def test_answers_that_nest_or_grow_without_end_are_drawn_bounded(
    fake_base: str, context: BrowserContext
):
    page = context.new_page()
    page.set_default_timeout(15000)
    open_with_stored_chat(page, fake_base, stored_chat(*PATHOLOGICAL.values()), drawing=False)
    page.wait_for_selector(".msg.assistant .answer")
    drawn_ms = page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
    assert drawn_ms < 10000  # the old renderer took minutes (fence, code) or crashed
    answers = page.locator(".msg.assistant .answer")
    assert answers.count() == len(PATHOLOGICAL)
    depth = page.evaluate(
        """() => Math.max(...[...document.querySelectorAll('.answer *')].map((e) => {
            let n = 0;
            for (; !e.classList.contains('answer'); e = e.parentElement) n++;
            return n;
        }))"""
    )
    assert depth <= 40
    quotes, lists, table = (answers.nth(i) for i in range(3))
    assert (quotes.locator(".plain").text_content() or "").count(">") > 3000  # the rest, as text
    assert (lists.text_content() or "").endswith("deep")
    assert 1000 < table.locator("tr").count() <= 10000
    assert (table.locator(".plain").last.text_content() or "").rstrip().endswith("| 1 | 2 | 3 |")
    assert page.evaluate("localStorage.getItem('textstream-drawing')") is None  # drawn


def test_a_chat_that_died_while_drawn_opens_as_plain_text(fake_base: str, context: BrowserContext):
    page = context.new_page()
    answer_source = "**Paris** is `here`."
    open_with_stored_chat(page, fake_base, stored_chat(answer_source), drawing=True)
    page.wait_for_selector("#plain-note")
    assert answer(page, 0).text_content() == answer_source  # as typed, no markdown
    assert answer(page, 0).locator("strong, code").count() == 0
    page.reload()  # it stays plain: the mark is kept on the chat
    page.wait_for_selector("#plain-note")

    page.click("#plain-note button")  # the way out
    page.wait_for_selector(".msg.assistant .answer strong")
    assert page.locator("#plain-note").count() == 0
    page.reload()
    page.wait_for_selector(".msg.assistant .answer strong")


def test_the_page_and_docs_send_security_headers(fake_base: str):
    policies = {}
    for path in ("/", "/docs", "/redoc", "/static/chat.js", "/health", "/openapi.json"):
        response = httpx.get(fake_base + path)
        assert response.status_code == 200, path
        assert response.headers["x-frame-options"] == "DENY", path
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["referrer-policy"] == "same-origin", path
        policies[path] = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policies[path], path
    assert "script-src 'self';" in policies["/"] and "unsafe-inline" not in policies["/"]
    assert "'unsafe-inline'" not in policies["/docs"].split("script-src")[1].split(";")[0]
    assert policies["/health"].startswith("default-src 'none';")
    assert "<script>" not in httpx.get(fake_base + "/").text  # the script is a file


def test_the_page_and_docs_work_under_their_csp_and_refuse_to_be_framed(
    fake_base: str, context: BrowserContext
):
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    context.add_init_script(
        "window.violations = []; addEventListener('securitypolicyviolation',"
        " (e) => violations.push(e.violatedDirective + ' ' + e.blockedURI));"
    )
    open_page(page, fake_base, "fake")
    set_max_tokens(page, 5)
    with page.expect_request(is_job_post) as posted:
        assert ask(page, "Hi")  # fetch, EventSource and drawing, all under the CSP
    # The page's own POST keeps its Origin (for an origin check) under its Referrer-Policy.
    assert posted.value.header_value("origin") == fake_base
    assert page.evaluate("violations") == [] and errors == []

    framing = f'<iframe src="{fake_base}/" width="600" height="400"></iframe>'
    with serving(framing) as elsewhere:  # another origin, on this machine
        page.goto(elsewhere)  # "load": its frame has loaded too
    frame = page.frames[1]
    assert frame.evaluate("document.getElementById('composer') === null")  # none of the page
    assert frame.url.startswith("chrome-error:")  # Chromium refused to show it
    assert any("frame-ancestors 'none'" in e for e in errors)
    errors.clear()

    page.goto(fake_base + "/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert page.evaluate("violations") == []
    page.goto(fake_base + "/redoc")
    page.wait_for_selector("redoc h1")
    cdn = "cdn.redoc.ly"  # ReDoc's "powered by" logo: refused, as the network is offline
    assert [v for v in page.evaluate("violations") if cdn not in v] == []
    assert [e for e in errors if cdn not in e] == []
