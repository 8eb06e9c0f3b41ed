"""The two-step jobs API: create, follow (resumably), inspect, cancel."""

from __future__ import annotations

import threading
import time

import httpx
import redis
from helpers import parse_sse_lines, stream, wait_for

from textstream import keys


def create(base: str, **body) -> str:
    response = httpx.post(base + "/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["events_url"] == f"/jobs/{created['id']}/events"
    assert created["status_url"] == f"/jobs/{created['id']}"
    return str(created["id"])


def read_some(base: str, job_id: str, tokens: int, **headers: str) -> list:
    """Read events until `tokens` token events have arrived, then hang up."""
    events, seen = [], 0
    with httpx.stream("GET", f"{base}/jobs/{job_id}/events", headers=headers, timeout=30) as r:
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if line == "":
                events += parse_sse_lines(lines)
                lines = []
                seen = sum(e.event == "token" for e in events)
                if seen >= tokens or (events and events[-1].event in ("done", "error")):
                    break
    return events


def test_job_runs_and_its_status_reports_the_text(service):
    job_id = create(service.base, prompt="The capital of France is", max_new_tokens=30)
    response = stream(service.base, f"/jobs/{job_id}/events")
    assert response.status == 200 and response.last.event == "done"
    status = httpx.get(f"{service.base}/jobs/{job_id}", timeout=5).json()
    assert status["status"] == "done" and status["text"] == response.text
    assert status["usage"] == response.last.data["usage"]
    assert status["finish_reason"] == "stop" and status["last_event_id"] == response.last.id


def test_a_job_takes_chat_messages_as_the_chat_api_does(service, tiny_model_dir):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "The capital of France is"},
    ]
    job_id = create(service.base, messages=messages, max_new_tokens=8, ignore_eos=True)
    response = stream(service.base, f"/jobs/{job_id}/events")
    assert response.last.event == "done"
    # The worker laid out all four turns (GPT-2 has no template: "Role: content" lines).
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    layout = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    expected = len(tokenizer.encode(layout + "Assistant:"))
    assert response.last.data["usage"]["prompt_tokens"] == expected
    for body in ({"prompt": "x", "messages": messages}, {"max_new_tokens": 3}, {"messages": []}):
        refused = httpx.post(service.base + "/jobs", json=body, timeout=10)
        assert refused.status_code == 422, body


def test_stream_resumes_from_last_event_id_mid_stream(service):
    job_id = create(service.base, prompt="Hello", max_new_tokens=400, ignore_eos=True)
    first = read_some(service.base, job_id, tokens=5)
    assert first[-1].event == "token"
    rest = stream(service.base, f"/jobs/{job_id}/events", last_event_id=first[-1].id).events
    whole = stream(service.base, f"/jobs/{job_id}/events").events
    assert [e.id for e in first + rest] == [e.id for e in whole]  # none repeated, none missed
    assert rest[-1].event == "done"
    # The header a browser EventSource sends on reconnect works the same way.
    again = read_some(service.base, job_id, tokens=10**6, **{"Last-Event-ID": first[-1].id})
    assert [e.id for e in again] == [e.id for e in rest]


def test_resuming_after_done_answers_204_so_an_eventsource_stops(service):
    job_id = create(service.base, prompt="Hello", max_new_tokens=3)
    done = stream(service.base, f"/jobs/{job_id}/events").last
    started = time.monotonic()
    after = httpx.get(
        f"{service.base}/jobs/{job_id}/events", headers={"Last-Event-ID": done.id}, timeout=10
    )
    assert after.status_code == 204 and after.content == b""
    assert time.monotonic() - started < 2


def test_two_readers_follow_one_job(service):
    job_id = create(service.base, prompt="Hello", max_new_tokens=200, ignore_eos=True)
    results: list = [None, None]

    def follow(i: int) -> None:
        results[i] = stream(service.base, f"/jobs/{job_id}/events")

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results[0].last.event == "done"
    assert [(e.id, e.data) for e in results[0].events] == [
        (e.id, e.data) for e in results[1].events
    ]


def test_leaving_a_job_stream_does_not_cancel_it(service):
    job_id = create(service.base, prompt="Hello", max_new_tokens=300, ignore_eos=True)
    read_some(service.base, job_id, tokens=2)

    def status() -> str:
        return httpx.get(f"{service.base}/jobs/{job_id}", timeout=5).json()["status"]

    wait_for(lambda: status() in ("done", "error", "cancelled"), 30, "the job to end")
    assert status() == "done"


def test_delete_cancels_a_running_job(service, redis_client):
    # Regression: with ignore_eos the tiny model emits mostly end-of-text tokens,
    # which decode to no text, so no event is written that could carry the cancel
    # flag back; the worker must poll for it.
    job_id = create(service.base, prompt="Hello", max_new_tokens=1000, ignore_eos=True)
    read_some(service.base, job_id, tokens=3)
    response = httpx.delete(f"{service.base}/jobs/{job_id}", timeout=5)
    assert response.status_code == 202 and response.json()["status"] == "cancelling"
    events = stream(service.base, f"/jobs/{job_id}/events").events
    assert events[-1].event == "error" and events[-1].data["error"]["type"] == "cancelled"
    cancel_ms = int(redis_client.hget(keys.job_state(job_id), "cancel"))
    late = [e for e in events if e.event == "token" and int(e.id.split("-")[0]) > cancel_ms]
    assert len(late) <= 2
    assert httpx.get(f"{service.base}/jobs/{job_id}", timeout=5).json()["status"] == "cancelled"
    assert httpx.delete(f"{service.base}/jobs/{job_id}", timeout=5).status_code == 409


def test_unknown_and_malformed_job_ids_are_404(service):
    for path in ["/jobs/0123456789abcdef0123456789abcdef", "/jobs/nope", "/jobs/nope/events"]:
        response = httpx.get(service.base + path, timeout=5)
        assert response.status_code == 404
        assert "expired" in response.json()["error"]["message"]
    assert httpx.delete(service.base + "/jobs/" + "a" * 32, timeout=5).status_code == 404


def test_expired_job_is_404_with_a_clear_message(make_service):
    svc = make_service(model="fake:200", JOB_TTL="1")  # JOB_TTL is under test, not the model
    job_id = create(svc.base, prompt="Hi", max_new_tokens=2)
    assert stream(svc.base, f"/jobs/{job_id}/events").last.event == "done"
    wait_for(
        lambda: httpx.get(f"{svc.base}/jobs/{job_id}", timeout=5).status_code == 404, 5, "expiry"
    )
    body = httpx.get(f"{svc.base}/jobs/{job_id}/events", timeout=5).json()
    assert body["error"]["type"] == "not_found" and "JOB_TTL" in body["error"]["message"]


def test_any_api_process_serves_any_job(service, tmp_path):
    from helpers import start_api

    other, other_base = start_api(service.env, tmp_path, name="api-2")
    try:
        job_id = create(service.base, prompt="The capital of France is", max_new_tokens=20)
        here = stream(service.base, f"/jobs/{job_id}/events")
        there = stream(other_base, f"/jobs/{job_id}/events")
        assert there.last.event == "done"
        assert [(e.id, e.data) for e in there.events] == [(e.id, e.data) for e in here.events]
        status = httpx.get(f"{other_base}/jobs/{job_id}", timeout=5).json()
        assert status["status"] == "done" and status["text"] == here.text
    finally:
        other.stop()


def test_idle_streams_get_comment_pings(make_service):
    svc = make_service(workers=0, SSE_PING_SECONDS="1", QUEUE_STATUS_SECONDS="60")
    job_id = create(svc.base, prompt="nobody will run this")
    pings, started = 0, time.monotonic()
    with httpx.stream("GET", f"{svc.base}/jobs/{job_id}/events", timeout=10) as response:
        for line in response.iter_lines():
            pings += line.startswith(": ping")
            if pings >= 2 or time.monotonic() - started > 5:
                break
    assert pings >= 2


def test_a_resume_after_a_token_inside_a_run_gets_exactly_the_rest(service):
    """A worker stores the tokens it has ready together as one entry (a run); every
    token keeps its own SSE id. Resuming after one in the middle of a run gets
    exactly the tokens after it (also for two identical resumes at once), and an id
    in the run's millisecond that no event has is refused."""
    job_id = create(service.base, prompt="Hello", max_new_tokens=200, ignore_eos=True)
    whole = stream(service.base, f"/jobs/{job_id}/events").events
    ids = [e.id for e in whole]
    assert len(set(ids)) == len(ids) and whole[-1].event == "done"
    client = redis.Redis.from_url(service.env["REDIS_URL"])
    runs = [
        (entry_id.decode(), fields[b"data"].count(b"\n") + 1)
        for entry_id, fields in client.xrange(keys.job_events(job_id))
        if fields[b"event"] == b"tokens"
    ]
    entry_id, count = max(runs, key=lambda run: run[1])
    assert count >= 3, runs
    ms, seq = map(int, entry_id.split("-"))
    middle = f"{ms}-{seq + 1}"
    expected = ids[ids.index(middle) + 1 :]
    rests: list = [None, None]

    def resume(i: int) -> None:
        rests[i] = stream(service.base, f"/jobs/{job_id}/events", last_event_id=middle)

    threads = [threading.Thread(target=resume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [e.id for e in rests[0].events] == [e.id for e in rests[1].events] == expected
    made_up = f"{ms}-{seq + count + 10**6}"
    assert made_up not in ids
    refused = httpx.get(
        f"{service.base}/jobs/{job_id}/events", headers={"Last-Event-ID": made_up}, timeout=10
    )
    assert refused.status_code == 400 and refused.json()["error"]["field"] == "Last-Event-ID"
