"""An upstream that holds a worker slot: keep-alive comments for ever, a trickle of
bytes, silence after its headers, no answer at all, or far too much text. Whatever
it does, a cancel and the job's deadline end the job within about a second, with
or without a reader, the upstream connection is closed, and the slot serves the
next job. (A real HTTP server, real worker processes, a real Redis.)

The prompt names the misbehaviour and a tag of its own (`keepalive-1a2b3c4d`), by
which the server records when it saw each request's connection close."""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import pytest
import redis
from conftest import Service
from helpers import (
    completion_chunk,
    service_env,
    start_event_stream,
    stored_events,
    stream,
    wait_for,
)

from textstream import keys

JOB_TIMEOUT = 5.0
PIECE_LIMIT = 10_000
OUTPUT_LIMIT = 20_000
RAW = {"prompt_format": "raw", "ignore_eos": True}


class Stalling(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    opened: ClassVar[dict[str, float]] = {}  # tag -> when its request came
    closed: ClassVar[dict[str, float]] = {}  # tag -> when its connection was seen closed
    stop = threading.Event()  # the module is done: end every stall

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # /v1/models
        data = json.dumps({"object": "list", "data": [{"id": "stalling", "object": "model"}]})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data.encode())

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        found = re.search(r"([a-z]+)-[0-9a-f]{8}", body.get("prompt", ""))
        tag = found.group(0) if found else "ok-00000000"
        Stalling.opened[tag] = time.monotonic()
        try:
            self._play(tag.split("-")[0])
        except OSError:
            pass
        finally:
            Stalling.closed[tag] = time.monotonic()

    def _gone(self) -> bool:
        """The client closed its end (a FIN or a reset waits to be read)."""
        if Stalling.stop.is_set():
            return True
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _pause(self, seconds: float) -> bool:
        """Wait, watching the connection; False once the client is gone."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            if self._gone():
                return False
            time.sleep(0.05)
        return not self._gone()

    def _play(self, mode: str) -> None:
        if mode == "mute":  # never answers, not even its headers
            while self._pause(0.2):
                pass
            return
        send = start_event_stream(self)
        if mode == "keepalive":  # as OpenRouter while a request waits
            while self._pause(0.2):
                send(b": keep-alive\n\n")
        elif mode == "trickle":  # one chunk, a byte at a time: it never completes
            for byte in completion_chunk(" w0") * 100:
                if not self._pause(0.5):
                    return
                send(bytes([byte]))
        elif mode == "silent":  # headers, then nothing
            while self._pause(0.2):
                pass
        elif mode == "huge":  # one piece past any token
            send(completion_chunk("x" * (PIECE_LIMIT * 20), "stop"))
        elif mode == "endless":  # big pieces, ignoring max_tokens
            for _ in range(200):
                send(completion_chunk("y" * 1000))
        elif mode == "line":  # a `data:` line that never ends (6.4 MB/s, for 10 s)
            send(b'data: {"choices": [{"index": 0, "text": "')
            for _ in range(1000):
                if not self._pause(0.01):
                    return
                send(b"z" * 65536)
        else:  # ok
            for i in range(3):
                send(completion_chunk(f" w{i}", "stop" if i == 2 else None))
        send(b"data: [DONE]\n\n")


@pytest.fixture(scope="module")
def stalling() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    Stalling.stop.set()
    server.shutdown()


def own_database(redis_url: str, db: int) -> str:
    url = f"{redis_url.rsplit('/', 1)[0]}/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def relay(
    stalling: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """One relaying worker with two slots, as in the review's report."""
    env = service_env(
        own_database(redis_url, 14),
        f"openai:{stalling}#stalling",
        JOB_TIMEOUT=str(JOB_TIMEOUT),
        UPSTREAM_RETRY_SECONDS="1",
        UPSTREAM_MAX_PIECE_CHARS=str(PIECE_LIMIT),
        MAX_OUTPUT_CHARS=str(OUTPUT_LIMIT),
    )
    svc = Service(tmp_path_factory.mktemp("stalls"), env, workers=1, concurrency=2)
    yield svc
    svc.stop()


def submit(base: str, mode: str, **body: Any) -> tuple[str, str]:
    """A job (no one reads it); returns its id and the upstream's tag for it."""
    tag = f"{mode}-{uuid.uuid4().hex[:8]}"
    fields = {"prompt": f"please {tag}", "max_new_tokens": 50, **RAW, **body}
    response = httpx.post(base + "/jobs", json=fields, timeout=10)
    assert response.status_code == 202, response.text
    return str(response.json()["id"]), tag


def events(svc: Service, job_id: str) -> list[Any]:
    client = redis.Redis.from_url(svc.env["REDIS_URL"])
    try:
        return stored_events(client, keys.job_events(job_id))
    finally:
        client.close()


def ended(svc: Service, job_id: str) -> Any:
    last = events(svc, job_id)
    return last[-1] if last and last[-1].event in ("done", "error") else None


def wait_ended(svc: Service, job_id: str, seconds: float, what: str) -> str:
    """The type of the error the job ended with, once it ended."""
    wait_for(lambda: ended(svc, job_id) is not None, max(seconds, 0.1), what)
    return str(ended(svc, job_id).data.get("error", {}).get("type"))


def wait_closed(tag: str, seconds: float) -> float:
    """When the upstream saw the request's connection close."""
    wait_for(lambda: tag in Stalling.closed, seconds, f"the upstream connection of {tag} to close")
    return Stalling.closed[tag]


def wait_running(svc: Service, job_id: str, tag: str) -> None:
    wait_for(lambda: tag in Stalling.opened, 15, "the upstream to get the request")
    wait_for(lambda: any(e.event == "started" for e in events(svc, job_id)), 5, "started")


def assert_next_job_runs(svc: Service) -> None:
    """Both slots free again: two quick jobs are answered at once."""
    answers: list[Any] = []
    readers = [
        threading.Thread(
            target=lambda: answers.append(stream(svc.base, "/completion/hi", 15, **RAW))
        )
        for _ in range(2)
    ]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(20)
    assert [a.last.event for a in answers] == ["done", "done"], [a.events[-2:] for a in answers]


def test_a_cancel_ends_a_job_whose_upstream_sends_only_keep_alive_comments(relay):
    jobs = [submit(relay.base, "keepalive") for _ in range(2)]  # both slots
    for job_id, tag in jobs:
        wait_running(relay, job_id, tag)
    time.sleep(0.5)  # comments are flowing
    for job_id, _ in jobs:
        response = httpx.delete(f"{relay.base}/jobs/{job_id}", timeout=5)
        assert response.json()["status"] == "cancelling"
    cancelled_at = time.monotonic()
    for job_id, tag in jobs:
        assert wait_ended(relay, job_id, 2.5, "the cancel to be honoured") == "cancelled"
        assert wait_closed(tag, 2.5) - cancelled_at < 2.5
    assert_next_job_runs(relay)


@pytest.mark.parametrize("mode", ["trickle", "silent"])
def test_a_stalled_upstream_with_no_reader_ends_at_the_deadline(relay, mode):
    """A trickle (every byte restarts the SDK's per-read timeout) or silence after
    the headers: the worker itself ends the job with `timeout`, and lets go."""
    submitted = time.monotonic()
    jobs = [submit(relay.base, mode) for _ in range(2)]
    for job_id, tag in jobs:
        wait_running(relay, job_id, tag)
    for job_id, tag in jobs:
        left = JOB_TIMEOUT + 2.5 - (time.monotonic() - submitted)
        assert wait_ended(relay, job_id, left, "the deadline") == "timeout"
        assert wait_closed(tag, 2) - submitted < JOB_TIMEOUT + 3
    assert_next_job_runs(relay)


def test_a_cancel_is_honoured_before_the_upstream_answers_at_all(relay):
    job_id, tag = submit(relay.base, "mute")
    wait_running(relay, job_id, tag)
    httpx.delete(f"{relay.base}/jobs/{job_id}", timeout=5)
    assert wait_ended(relay, job_id, 2.5, "the cancel to be honoured") == "cancelled"
    assert_next_job_runs(relay)
    # The request's own timeout is capped at the job's deadline: it lets go then.
    wait_closed(tag, JOB_TIMEOUT + 3)


def test_a_piece_too_long_for_any_token_is_an_upstream_error(relay):
    response = stream(relay.base, "/completion/huge-0123abcd", 20, max_new_tokens=5, **RAW)
    assert response.last.event == "error", response.events[-2:]
    assert response.last.data["error"]["type"] == "upstream_error"
    assert response.text == ""


def test_a_line_that_never_ends_is_cut_off_not_buffered(relay):
    started = time.monotonic()
    response = stream(relay.base, "/completion/line-0123abcd", 20, max_new_tokens=5, **RAW)
    assert response.last.event == "error", response.events[-2:]
    assert response.last.data["error"]["type"] == "upstream_error"
    assert time.monotonic() - started < JOB_TIMEOUT
    wait_closed("line-0123abcd", 3)


def test_a_jobs_output_is_bounded_whatever_the_upstream_sends(relay):
    """200 pieces of 1,000 characters asked for: MAX_OUTPUT_CHARS (20,000) ends
    the job with finish reason `length` and the text whole up to there."""
    response = stream(relay.base, "/completion/endless-0123abcd", 20, max_new_tokens=200, **RAW)
    assert response.last.event == "done", response.events[-2:]
    assert response.last.data["finish_reason"] == "length"
    assert response.text == "y" * OUTPUT_LIMIT


def test_a_slow_fake_engine_ends_at_the_deadline_with_no_reader(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
):
    """One word every 20 s: the worker ends the job at JOB_TIMEOUT (3 s), not at
    its next word, and its slot takes the next job."""
    env = service_env(own_database(redis_url, 13), "fake:0.05", JOB_TIMEOUT="3")
    svc = Service(tmp_path_factory.mktemp("slowfake"), env, workers=1)
    try:
        submitted = time.monotonic()
        body = {"prompt": "hi", "max_new_tokens": 5, **RAW}
        job_id = httpx.post(svc.base + "/jobs", json=body, timeout=10).json()["id"]
        assert wait_ended(svc, job_id, 5.5, "the deadline") == "timeout"
        assert time.monotonic() - submitted < 6
        following = httpx.post(svc.base + "/jobs", json=body, timeout=10).json()["id"]
        started = lambda: any(e.event == "started" for e in events(svc, following))  # noqa: E731
        wait_for(started, 3, "the slot to take the next job")
    finally:
        svc.stop()
