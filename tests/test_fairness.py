"""Fair shares between API keys (textstream/fairness.py): one worker with one slot
and the fake engine (a fixed rate: a job of N tokens takes a known time), three
keys, one of them weighted. A flood from one key does not hold another's job past
one job's length; a priority reorders only its own key's jobs; one key cannot
take the whole queue."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from conftest import Service
from helpers import service_env

from bench.cluster import iter_sse_lines

KEYS = {"a": "key-a-secret", "b": "key-b-secret", "c": "key-c-secret"}
#: 200 tokens/s: a job of 30 tokens takes 0.15 s.
RATE = 200


@pytest.fixture(scope="module")
def svc(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    url = f"{redis_url.rsplit('/', 1)[0]}/15"
    client = redis.Redis.from_url(url)
    client.flushdb()
    env = service_env(
        url,
        f"fake:{RATE}",
        API_KEYS=",".join(KEYS.values()),
        MAX_QUEUED_JOBS="40",
        MAX_QUEUED_PER_CALLER="24",
    )
    service = Service(tmp_path_factory.mktemp("fair"), env, workers=1)
    yield service
    service.stop()
    client.flushdb()
    client.close()


def post(svc: Service, who: str, tokens: int, **body: object) -> httpx.Response:
    reply = httpx.post(
        svc.base + "/jobs",
        json={"prompt": "Hi", "max_new_tokens": tokens, "ignore_eos": True, **body},
        headers={"Authorization": f"Bearer {KEYS[who]}"},
        timeout=10,
    )
    assert reply.status_code in (202, 429), reply.text
    return reply


def started_at(svc: Service, who: str, job_id: str) -> float:
    """When the job's first token was stored (its event id's milliseconds), read
    once the job has ended."""
    headers = {"Authorization": f"Bearer {KEYS[who]}"}
    url = f"{svc.base}/jobs/{job_id}/events"
    with httpx.stream("GET", url, headers=headers, timeout=60) as reply:
        for event in iter_sse_lines(reply.iter_lines()):
            if event.event == "token" and event.id:
                return int(event.id.split("-")[0]) / 1000
    raise AssertionError(f"job {job_id} streamed no token")


def test_a_flood_from_one_key_does_not_hold_another_keys_job(svc: Service):
    flood = [post(svc, "a", 60).json()["id"] for _ in range(16)]  # 4.8 s of work
    b_posted = time.time()
    late = post(svc, "b", 30).json()["id"]
    b_started = started_at(svc, "b", late)
    a_started = sorted(started_at(svc, "a", job) for job in flood)
    waiting = sum(1 for t in a_started if t > b_posted)
    assert waiting >= 6  # B arrived behind a queue of A's
    ahead = sum(1 for t in a_started if b_posted < t < b_started)
    # In arrival order all of them would run first. Fair: once B waits, its counter
    # is lifted to A's (no credit), so B is next or, on a tie, after one more of A's.
    assert ahead <= 1, f"{ahead} of A's {waiting} waiting jobs ran before B's"


def test_a_priority_reorders_only_its_own_keys_jobs(svc: Service):
    blocker = post(svc, "c", 300).json()["id"]  # holds the one slot for 1.5 s
    plain = [post(svc, "a", 10).json()["id"] for _ in range(3)]
    urgent = post(svc, "a", 10, priority=-5).json()["id"]
    other = post(svc, "b", 10).json()["id"]
    times = {job: started_at(svc, who, job) for who, job in [("c", blocker), ("b", other)]}
    times |= {job: started_at(svc, "a", job) for job in [*plain, urgent]}
    a_order = sorted([*plain, urgent], key=times.__getitem__)
    assert a_order[0] == urgent  # first of A's, though A's last to arrive
    assert a_order[1:] == plain  # the rest in arrival order
    # B's one job is not pushed behind A's urgent one and A's others: B and A share.
    assert sum(1 for job in plain if times[job] < times[other]) <= 1


def test_one_key_cannot_take_the_whole_queue(svc: Service):
    blocker = post(svc, "c", 1000).json()["id"]  # 5 s: the rest wait behind it
    replies = [post(svc, "a", 5) for _ in range(26)]
    accepted = [r for r in replies if r.status_code == 202]
    refused = [r for r in replies if r.status_code == 429]
    assert len(accepted) == 24 and len(refused) == 2
    assert "this caller already has 24 jobs waiting" in refused[0].json()["error"]["message"]
    assert refused[0].headers["Retry-After"]
    other = post(svc, "b", 5)  # the queue (40) still has room for another key
    assert other.status_code == 202
    headers = {"Authorization": f"Bearer {KEYS['c']}"}
    assert httpx.delete(f"{svc.base}/jobs/{blocker}", headers=headers).status_code == 202
    started_at(svc, "b", other.json()["id"])
    for reply in accepted:
        started_at(svc, "a", reply.json()["id"])


def test_weights_are_checked_at_start(tmp_path: Path):
    from textstream.config import parse_key_weights

    assert parse_key_weights("k1=2, k2=0.5") == {"k1": 2.0, "k2": 0.5}
    for bad in ("k1=0", "k1=nan", "k1=1e9", "k1", "=2", "k1=-1"):
        with pytest.raises(ValueError, match="API_KEY_WEIGHTS"):
            parse_key_weights(bad)


def events_of(svc: Service, who: str, job_id: str) -> list[str]:
    headers = {"Authorization": f"Bearer {KEYS[who]}"}
    url = f"{svc.base}/jobs/{job_id}/events"
    with httpx.stream("GET", url, headers=headers, timeout=60) as reply:
        return [f"{e.event} {e.data}" for e in iter_sse_lines(reply.iter_lines()) if e.id]


def test_a_job_past_its_queue_timeout_never_runs(svc: Service):
    """Behind a 4 s job, one that will wait 0.5 s (body field or header) leaves the
    queue with `queue_timeout` while the slot is still taken, and never starts; one
    that will wait longer runs. A bad wait is refused and queues nothing."""
    auth = {"Authorization": f"Bearer {KEYS['c']}"}
    blocker = post(svc, "c", 800).json()["id"]
    by_body = post(svc, "a", 5, queue_timeout=0.5).json()["id"]
    by_header = httpx.post(
        svc.base + "/jobs",
        json={"prompt": "Hi", "max_new_tokens": 5},
        headers={"Authorization": f"Bearer {KEYS['b']}", "X-Queue-Timeout": "0.5"},
        timeout=10,
    ).json()["id"]
    patient = post(svc, "a", 5, queue_timeout=60).json()["id"]
    for who, job in (("a", by_body), ("b", by_header)):
        seen = events_of(svc, who, job)
        assert [e.split(" ")[0] for e in seen] == ["queued", "error"], seen
        assert "queue_timeout" in seen[-1]
        status = httpx.get(
            f"{svc.base}/jobs/{job}", headers={"Authorization": f"Bearer {KEYS[who]}"}
        )
        assert status.json()["status"] == "error"
    # Ended by the janitor while the blocker still ran, not when a worker got to it.
    assert httpx.get(f"{svc.base}/jobs/{blocker}", headers=auth).json()["status"] == "running"
    assert events_of(svc, "a", patient)[-1].startswith("done")  # after the blocker
    for bad in ("0", "-1", "nan", "inf", "soon", "1e9"):
        reply = httpx.post(
            svc.base + "/jobs",
            json={"prompt": "Hi"},
            headers={**auth, "X-Queue-Timeout": bad},
            timeout=10,
        )
        assert reply.status_code == 400 and "X-Queue-Timeout" in reply.text, (bad, reply.text)
    for bad in (0, -1, 1e9, "soon"):
        assert post_status(svc, queue_timeout=bad) == 422


def post_status(svc: Service, **body: object) -> int:
    headers = {"Authorization": f"Bearer {KEYS['c']}"}
    reply = httpx.post(svc.base + "/jobs", json={"prompt": "Hi", **body}, headers=headers)
    return reply.status_code
