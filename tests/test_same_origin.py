"""Same-origin by default (api/origin.py): a page on another site cannot start work
on an open textstream, and a textstream on localhost answers only to local names.

An outside review sent a `no-cors` fetch with a body and no content type from a
page on another origin: a job was created and generated; and a request with
`Host: attacker.example` got 202 (DNS rebinding would let a site read answers
from a textstream on localhost). The browser test does what a hostile page does,
in a real Chromium; the others send the headers a browser sends."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import redis
from helpers import queued, service_env, serving, start_api
from playwright.sync_api import sync_playwright

from bench.cluster import chromium_options

#: A database of this module's own on the session's Redis.
DB = 9


@pytest.fixture(scope="module")
def api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An open API (no keys, no CORS_ORIGINS) and no worker: whatever is accepted
    stays in the queue, where the tests can count it."""
    env = service_env(database(redis_url), "fake:1000")
    proc, base = start_api(env, tmp_path_factory.mktemp("origin"))
    yield base
    proc.stop()


@pytest.fixture
def store(api: str, redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(database(redis_url))
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def database(redis_url: str, number: int = DB) -> str:
    return f"{redis_url.rsplit('/', 1)[0]}/{number}"


def accepted_jobs(client: redis.Redis) -> int:
    """Jobs the API wrote anywhere: queued, or with an event stream."""
    waiting = sum(queued(client, key) for key in client.keys("textstream:queue:*:ml_tasks"))
    return waiting + len(client.keys("textstream:job:*"))


def post(base: str, headers: dict[str, str], body: bytes = b'{"prompt": "hi"}') -> httpx.Response:
    return httpx.post(base + "/jobs", content=body, headers=headers, timeout=10)


JSON = {"content-type": "application/json"}
EVIL = "http://evil.example"


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": EVIL, "content-type": "text/plain;charset=UTF-8"},  # a no-cors fetch
        {"origin": EVIL, **JSON},  # a CORS request (its preflight would fail; this is the POST)
        {"origin": "null", **JSON},  # a sandboxed iframe, a file:// page
        {"origin": "http://127.0.0.1:1", **JSON},  # same host, another port
        # A Host without a port was reached on a default one: not the page's 3000.
        {"origin": "http://localhost:3000", "host": "localhost", **JSON},
    ],
    ids=["no-cors", "cors", "null", "other-port", "portless-host"],
)
def test_a_cross_origin_post_is_refused_403_and_queues_nothing(api, store, headers):
    response = post(api, headers)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["type"] == "forbidden_origin"
    assert accepted_jobs(store) == 0


def test_a_cross_site_get_that_would_start_a_job_is_refused(api, store):
    """An <img src> or a link to /completion/…: a no-cors GET sends no Origin; the
    browser says where it came from in Sec-Fetch-Site."""
    for site in ("cross-site", "same-site"):
        headers = {"sec-fetch-site": site, "sec-fetch-mode": "no-cors"}
        response = httpx.get(api + "/completion/hi", headers=headers, timeout=10)
        assert response.status_code == 403
    assert accepted_jobs(store) == 0
    # Reading what needs no work stays open (a cross-site page cannot read it anyway).
    assert httpx.get(api + "/health", headers={"sec-fetch-site": "cross-site"}).status_code == 200


def test_same_origin_and_non_browser_clients_pass(api, store):
    port = api.rsplit(":", 1)[1]
    assert post(api, {"origin": f"http://127.0.0.1:{port}", **JSON}).status_code == 202
    assert post(api, {"sec-fetch-site": "same-origin", **JSON}).status_code == 202
    assert post(api, JSON).status_code == 202  # curl, the SDKs: neither header
    assert accepted_jobs(store) > 0


def test_a_body_without_a_json_content_type_is_refused_415(api, store):
    for headers in ({}, {"content-type": "text/plain"}):
        response = post(api, headers)
        assert response.status_code == 415, response.text
    response = httpx.post(api + "/v1/completions", content=b'{"model": "m", "prompt": "hi"}')
    assert response.status_code == 415 and response.json()["error"]["code"]
    assert accepted_jobs(store) == 0


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "10.0.0.1"])
def test_on_loopback_a_foreign_host_name_is_refused(api, store, host):
    """DNS rebinding: attacker.example resolved to 127.0.0.1."""
    for method, path in (("POST", "/jobs"), ("GET", "/metrics"), ("GET", "/v1/models")):
        response = httpx.request(
            method, api + path, headers={"host": host, **JSON}, content=b'{"prompt": "hi"}'
        )
        assert response.status_code == 400, (path, response.text)
        assert "ALLOWED_HOSTS" in response.text
    assert accepted_jobs(store) == 0


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "app.localhost", "[::1]:80"])
def test_on_loopback_local_host_names_pass(api, host):
    assert httpx.get(api + "/v1/models", headers={"host": host}).status_code == 200


def test_allowed_hosts_names_the_hosts_behind_a_proxy(redis_url, tmp_path):
    url = database(redis_url, DB + 1)
    env = service_env(url, "fake:1000", ALLOWED_HOSTS="api.example.com,*.example.org")
    proc, base = start_api(env, tmp_path)
    try:
        for host, status in (
            ("api.example.com", 200),
            ("x.example.org", 200),
            ("example.org", 200),
            ("localhost", 400),  # listed names only, once there is a list
            ("evil.example.com", 400),
        ):
            assert httpx.get(base + "/v1/models", headers={"host": host}).status_code == status
        # Probes name the server by its address.
        assert httpx.get(base + "/ready", headers={"host": "10.1.2.3:8000"}).status_code != 400
    finally:
        proc.stop()
        redis.Redis.from_url(url).flushdb()


def hostile_page(api: str) -> str:
    """A page on another origin that tries to start jobs on the API every way a page
    can without CORS: no-cors fetches (with and without a content type), an
    EventSource and an image on /completion."""
    return f"""<html><body><script>
      fetch("{api}/jobs", {{method: "POST", mode: "no-cors", body: '{{"prompt": "x"}}'}});
      fetch("{api}/jobs", {{method: "POST", mode: "no-cors",
        headers: {{"content-type": "text/plain"}}, body: '{{"prompt": "x"}}'}});
      fetch("{api}/v1/completions", {{method: "POST", mode: "no-cors",
        body: '{{"model": "fake-1000tps", "prompt": "x"}}'}});
      new EventSource("{api}/completion/from-an-event-source");
      const img = new Image(); img.src = "{api}/completion/from-an-image";
      setTimeout(() => {{ document.title = "sent"; }}, 1500);
    </script></body></html>"""


def test_a_hostile_page_in_chromium_starts_nothing(api, store):
    with serving(hostile_page(api)) as elsewhere, sync_playwright() as p:
        browser = p.chromium.launch(**chromium_options())
        page = browser.new_page()
        # localhost, not 127.0.0.1: another origin than the API's, on this machine.
        page.goto(elsewhere.replace("127.0.0.1", "localhost"))
        page.wait_for_function("document.title === 'sent'", timeout=10_000)
        page.wait_for_timeout(500)
        browser.close()
    assert accepted_jobs(store) == 0
