"""A /completion stream is its job, across reconnects (EventSource's Last-Event-ID).

Event ids name the job (`<job id>:<event id>`), so a client that comes back gets
the rest of that very job, on any API process, greedy or sampled, cached or not; a
job whose client dropped waits RECONNECT_GRACE_SECONDS for it before it is
cancelled. One deployment serves the module: a random-weight GPT-2 (a real model,
for sampled answers) and the fake engine (a known text at 20 tokens/s, long enough
to drop and come back mid-answer), behind two API processes, with API keys.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from helpers import SSEEvent, service_env, start_api, start_workers, wait_for, wait_for_workers
from playwright.sync_api import sync_playwright

from bench.cluster import chromium_options, iter_sse_lines
from textstream import keys

GRACE = 5
KEY, OTHER_KEY = "key-one", "key-two"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Deployment:
    base: str
    other: str  # a second API process on the same Redis
    redis: redis.Redis


@pytest.fixture(scope="module")
def deployment(
    redis_url: str, slow_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    url = f"{redis_url.rsplit('/', 1)[0]}/12"
    client = redis.Redis.from_url(url)
    client.flushdb()
    workdir = tmp_path_factory.mktemp("reconnect")
    env = service_env(
        url,
        str(slow_model_dir),
        RECONNECT_GRACE_SECONDS=str(GRACE),
        API_KEYS=f"{KEY},{OTHER_KEY}",
    )
    procs = [
        start_workers(env, workdir),
        start_workers({**env, "MODEL_ID": "fake:20"}, workdir, name="fake-worker"),
    ]
    api, base = start_api(env, workdir)
    other, other_base = start_api(env, workdir, name="api-2")
    procs += [api, other]
    try:
        wait_for_workers(base, 2, proc=procs[0])
        yield Deployment(base, other_base, client)
    finally:
        for proc in procs:
            proc.stop()
        client.flushdb()
        client.close()


@dataclass
class Read:
    status: int
    job_id: str
    body: str = ""
    events: list[SSEEvent] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(e.data["text"] for e in self.events if e.event == "token")

    @property
    def last_id(self) -> str:
        return [e.id for e in self.events if e.id][-1]


def read(
    base: str,
    question: str,
    params: dict[str, Any],
    last_id: str | None = None,
    drop_after: int | None = None,
    key: str = KEY,
) -> Read:
    """GET /completion, to its end or until `drop_after` token events (then the
    connection is closed, as a network drop would)."""
    headers = {"Authorization": f"Bearer {key}"}
    if last_id:
        headers["Last-Event-ID"] = last_id
    url = f"{base}/completion/{question}"
    with httpx.stream("GET", url, params=params, headers=headers, timeout=60) as response:
        result = Read(response.status_code, response.headers.get("x-job-id", ""))
        if response.status_code != 200:
            result.body = response.read().decode()
            return result
        for event in iter_sse_lines(response.iter_lines()):
            result.events.append(event)
            tokens = sum(e.event == "token" for e in result.events)
            if drop_after is not None and tokens >= drop_after:
                break
    return result


def job_state(deployment: Deployment, job_id: str) -> dict[bytes, bytes]:
    return deployment.redis.hgetall(keys.job_state(job_id))


GREEDY = {"max_new_tokens": 40, "temperature": 0, "use_cache": "false"}
FAKE = {"model": "fake-20tps", "max_new_tokens": 60}


def test_a_dropped_stream_goes_on_with_the_same_job_at_once(deployment: Deployment):
    """Greedy and not cached: the reconnect made at once joins the job its drop left
    (no `cancelled` from that drop), and the two parts make the uninterrupted answer."""
    whole = read(deployment.base, "The sea is", FAKE)
    first = read(deployment.base, "The sea is", FAKE, drop_after=3)
    assert first.status == 200, first
    assert first.events[0].id.startswith(first.job_id + ":")  # ids name their job
    rest = read(deployment.base, "The sea is", FAKE, last_id=first.last_id)
    assert rest.job_id == first.job_id
    assert all(e.event != "error" for e in rest.events)
    assert first.text + rest.text == whole.text
    assert [e.event for e in rest.events][-1] == "done"
    # Back after `done` (an EventSource reconnects when a stream ends): 204, so it stops.
    assert read(deployment.base, "The sea is", FAKE, last_id=rest.last_id).status == 204


def test_a_sampled_stream_resumes_on_another_api_process_after_a_pause(
    deployment: Deployment,
):
    """Sampled with no seed (never cached): back after 2 s on the other API process,
    the client gets the rest of the very answer it was reading, and after its end a
    204 from either process, never a new generation."""
    sampled = {"model": "slow-gpt2", "max_new_tokens": 60, "temperature": 1.0, "ignore_eos": "true"}
    first = read(deployment.base, "Once upon a time", sampled, drop_after=3)
    assert first.status == 200 and first.events[-1].event == "token", first
    time.sleep(2)
    rest = read(deployment.other, "Once upon a time", sampled, last_id=first.last_id)
    assert rest.job_id == first.job_id and rest.events[-1].event == "done"
    stored = httpx.get(f"{deployment.base}/jobs/{first.job_id}", headers=AUTH).json()
    assert first.text + rest.text == stored["text"]
    assert stored["usage"]["completion_tokens"] == 60
    for base in (deployment.base, deployment.other):
        again = read(base, "Once upon a time", sampled, last_id=rest.last_id)
        assert again.status == 204 and again.job_id == first.job_id


def test_a_client_that_does_not_come_back_stops_its_job_after_the_grace(
    deployment: Deployment,
):
    params = {**FAKE, "max_new_tokens": 1000}
    started = time.monotonic()
    first = read(deployment.base, "Tell me a story", params, drop_after=2)
    time.sleep(1)
    state = job_state(deployment, first.job_id)
    assert b"cancel" not in state and b"terminal" not in state, sorted(state.items())[-4:]
    wait_for(lambda: b"cancel" in job_state(deployment, first.job_id), GRACE + 10, "the cancel")
    assert time.monotonic() - started >= GRACE - 0.5
    # Back too late: the job ended with `cancelled`, which the client is told.
    rest = read(deployment.base, "Tell me a story", params, last_id=first.last_id)
    assert rest.job_id == first.job_id
    assert rest.events[-1].data["error"]["type"] == "cancelled"


def test_last_event_id_of_another_keys_job_starts_a_new_job(deployment: Deployment):
    mine = read(deployment.base, "The sea is", FAKE, drop_after=2)
    theirs = read(deployment.base, "The sea is", FAKE, last_id=mine.last_id, key=OTHER_KEY)
    assert theirs.job_id != mine.job_id and theirs.events[-1].event == "done"
    assert theirs.events[0].data["job_id"] == theirs.job_id  # its own job, from its start
    rest = read(deployment.base, "The sea is", FAKE, last_id=mine.last_id)
    assert rest.job_id == mine.job_id and rest.events[-1].event == "done"


@pytest.mark.parametrize(
    "last_id",
    ["zz:1-0", "0123456789abcdef0123456789abcdef:x", "0123456789abcdef0123456789abcdef:1-"],
)
def test_a_malformed_last_event_id_is_a_400(deployment: Deployment, last_id: str):
    response = httpx.get(
        f"{deployment.base}/completion/Hi",
        headers={**AUTH, "Last-Event-ID": last_id},
        timeout=10,
    )
    assert response.status_code == 400 and response.json()["error"]["field"] == "Last-Event-ID"


def test_an_event_id_that_is_not_the_jobs_is_a_400(deployment: Deployment):
    mine = read(deployment.base, "The sea is", FAKE, drop_after=1)
    made_up = f"{mine.job_id}:1-0"
    response = httpx.get(
        f"{deployment.base}/completion/The sea is",
        params=FAKE,
        headers={**AUTH, "Last-Event-ID": made_up},
        timeout=10,
    )
    assert response.status_code == 400


class DroppingProxy:
    """Serves a page whose EventSource reads /completion through this proxy, which
    forwards to the API (adding the API key, which an EventSource cannot send) and
    drops the first stream's TCP connection after `cut_after` token events."""

    def __init__(self, api_base: str, page: str, cut_after: int) -> None:
        self.last_event_ids: list[str | None] = []
        self.job_ids: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # a response ends when its socket closes

            def do_GET(self) -> None:
                if not self.path.startswith("/completion/"):  # the page (and a favicon)
                    body = page.encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.end_headers()
                    self.wfile.write(body)
                    return
                proxy.last_event_ids.append(self.headers.get("Last-Event-ID"))
                first = len(proxy.last_event_ids) == 1
                headers = dict(AUTH)
                if self.headers.get("Last-Event-ID"):
                    headers["Last-Event-ID"] = self.headers["Last-Event-ID"]
                url = api_base + self.path
                with httpx.stream("GET", url, headers=headers, timeout=60) as response:
                    proxy.job_ids.append(response.headers.get("x-job-id", ""))
                    self.send_response(response.status_code)
                    self.send_header("Content-Type", response.headers["content-type"])
                    self.end_headers()
                    tokens = 0
                    for line in response.iter_lines():
                        self.wfile.write(line.encode() + b"\n")
                        self.wfile.flush()
                        tokens += line == "event: token"
                        if first and line == "" and tokens >= cut_after:
                            self.connection.shutdown(2)  # the network drops
                            return

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


PAGE = """<!doctype html><title>reading</title><pre id="out"></pre><script>
const out = document.getElementById("out");
const source = new EventSource("/completion/The%20sea%20is?model=fake-20tps&max_new_tokens=60");
source.addEventListener("token", (e) => { out.textContent += JSON.parse(e.data).text; });
source.addEventListener("done", () => { source.close(); document.title = "done"; });
source.addEventListener("error", (e) => { if (e.data) document.title = "failed: " + e.data; });
</script>"""


def test_a_browser_eventsource_shows_the_answer_once_across_a_dropped_connection(
    deployment: Deployment,
):
    whole = read(deployment.base, "The sea is", FAKE)
    proxy = DroppingProxy(deployment.base, PAGE, cut_after=5)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(**chromium_options())
            page = browser.new_page()
            page.goto(proxy.base + "/")
            deadline = time.monotonic() + 45
            while page.title() == "reading" and time.monotonic() < deadline:
                time.sleep(0.2)
            title, shown = page.title(), page.text_content("#out")
            browser.close()
    finally:
        proxy.close()
    assert title == "done"
    assert len(proxy.last_event_ids) == 2 and proxy.last_event_ids[0] is None
    # The reconnect named the job it was reading, and got the rest of that job.
    first_job = proxy.job_ids[0]
    assert (proxy.last_event_ids[1] or "").startswith(first_job + ":")
    assert proxy.job_ids == [first_job, first_job] and first_job != whole.job_id
    assert shown == whole.text
