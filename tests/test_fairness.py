"""Fair shares between API keys (textstream/fairness.py): one worker with one slot
and the fake engine (a fixed rate: a job of N tokens takes a known time), three
keys, one of them weighted. A flood from one key does not hold another's job past
one job's length; a priority reorders only its own key's jobs; one key cannot
take the whole queue."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import redis
from conftest import Service
from helpers import service_env

from bench.cluster import iter_sse_lines, start_redis

KEYS = {"a": "key-a-secret", "b": "key-b-secret", "c": "key-c-secret"}
#: 200 tokens/s: a job of 30 tokens takes 0.15 s.
RATE = 200


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    # A Redis of its own: the shared one's databases go to tests' own services
    # (isolated_redis_url), whose workers must not see this module's jobs.
    proc, url = start_redis(tmp_path_factory.mktemp("fair-redis"))
    env = service_env(
        url,
        f"fake:{RATE}",
        API_KEYS=",".join(KEYS.values()),
        API_KEY_WEIGHTS=f"{KEYS['c']}=3",
        MAX_QUEUED_JOBS="40",
        MAX_QUEUED_PER_CALLER="24",
    )
    service = Service(tmp_path_factory.mktemp("fair"), env, workers=1)
    yield service
    service.stop()
    proc.terminate()
    proc.wait(10)


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


def test_weights_give_proportional_shares(svc: Service):
    """C weighs 3, A 1: while both wait, C's jobs run three to one of A's."""
    client = redis.Redis.from_url(svc.env["REDIS_URL"])
    # The service the earlier tests gave A and C is forgotten: a debt (a counter
    # above the others') is kept, as VTC keeps it, and would decide the order here.
    for key in client.scan_iter("textstream:queue:*:fair:*"):
        client.delete(key)
    blocker = post(svc, "b", 600).json()["id"]  # 3 s: both backlogs form behind it
    a_jobs = [post(svc, "a", 10).json()["id"] for _ in range(12)]
    c_jobs = [post(svc, "c", 10).json()["id"] for _ in range(12)]
    started_at(svc, "b", blocker)
    times = {job: started_at(svc, "a", job) for job in a_jobs}
    times |= {job: started_at(svc, "c", job) for job in c_jobs}
    first = sorted(a_jobs + c_jobs, key=times.__getitem__)[:12]
    c_share = sum(job in c_jobs for job in first)
    assert 8 <= c_share <= 10, f"C had {c_share} of the first 12 (3:1 would be 9)"


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
        # The smallest wait there is: gone at the janitor's next look, never run.
        headers={"Authorization": f"Bearer {KEYS['b']}", "X-Queue-Timeout": "1e-300"},
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


def test_a_token_quota_refuses_past_it_and_charges_what_was_used(make_service):
    """TOKEN_RATE_LIMIT: a request reserves its prompt and max_new_tokens; one past
    the quota gets a 429 (Retry-After, OpenAI's x-ratelimit-* headers) and queues
    nothing, another key is untouched, and once a job ends its caller is charged
    what it used, not what it reserved."""
    svc = make_service(
        model="fake:25",
        API_KEYS=",".join(KEYS.values()),
        TOKEN_RATE_LIMIT="200",
        RATE_LIMIT="100",
    )
    client = redis.Redis.from_url(svc.env["REDIS_URL"])
    if time.time() % 60 > 40:  # the quota's minute must not turn over mid-test
        time.sleep(61 - time.time() % 60)
    a = {"Authorization": f"Bearer {KEYS['a']}"}

    def ask(headers: dict[str, str], tokens: int, **body: object) -> httpx.Response:
        job = {"prompt": "Hi", "max_new_tokens": tokens, **body}
        return httpx.post(svc.base + "/jobs", json=job, headers=headers, timeout=10)

    # B's job holds the one slot for 7.6 s: A's waits behind it, its tokens reserved.
    assert ask({"Authorization": f"Bearer {KEYS['b']}"}, 190).status_code == 202
    first = ask(a, 150, stop=["lazy"])  # reserves 151; will stop after 7 words
    assert first.status_code == 202, first.text
    assert first.headers["x-ratelimit-limit-tokens"] == "200"
    assert first.headers["x-ratelimit-remaining-tokens"] == "200"
    assert first.headers["x-ratelimit-limit-requests"] == "100"
    assert first.headers["x-ratelimit-remaining-requests"] == "99"
    assert first.headers["x-ratelimit-reset-tokens"].endswith("s")
    refused = ask(a, 100)
    assert refused.status_code == 429 and "tokens a minute" in refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert int(refused.headers["x-ratelimit-remaining-tokens"]) < 100
    assert len(client.keys("textstream:job:*:events")) == 2  # the refusal wrote nothing
    assert ask({"Authorization": f"Bearer {KEYS['c']}"}, 100).status_code == 202
    too_big = ask(a, 250)
    assert too_big.status_code == 422 and "max_new_tokens" in too_big.text
    # Choices that together could never fit: 422 up front, not a 429 for ever.
    c = {"Authorization": f"Bearer {KEYS['c']}"}
    model = httpx.get(svc.base + "/v1/models", headers=c).json()["data"][0]["id"]
    choices = httpx.post(
        svc.base + "/v1/completions",
        json={"model": model, "prompt": "Hi", "max_tokens": 120, "n": 2},
        headers=c,
        timeout=10,
    )
    assert choices.status_code == 400 and "2 choices" in choices.text, choices.text
    # Through the openai SDK: the headers, and queue_timeout as an extra body field.
    sdk = openai.OpenAI(base_url=svc.base + "/v1", api_key=KEYS["c"], max_retries=0)
    raw = sdk.completions.with_raw_response.create(  # streamed: the headers come at once
        model=model, prompt="Hi", max_tokens=5, stream=True, extra_body={"queue_timeout": 30}
    )
    assert raw.headers["x-ratelimit-limit-tokens"] == "200"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) <= 99  # C's 100 + 1 held
    raw.parse().close()  # leaving stops it
    with pytest.raises(openai.RateLimitError):
        sdk.completions.create(model=model, prompt="Hi", max_tokens=150)
    with pytest.raises(openai.BadRequestError):
        sdk.completions.create(
            model=model, prompt="Hi", max_tokens=5, extra_body={"queue_timeout": 1e9}
        )
    # A job cancelled before it ran gives its reservation back at once.
    held = ask(a, 150, stop=["lazy"])
    assert held.status_code == 429  # `first` holds 151 of the 200
    first_id = first.json()["id"]
    assert httpx.delete(f"{svc.base}/jobs/{first_id}", headers=a).status_code == 202
    first = ask(a, 150, stop=["lazy"])
    assert first.status_code == 202, first.text
    events_url = f"{svc.base}/jobs/{first.json()['id']}/events"
    with httpx.stream("GET", events_url, headers=a, timeout=30) as reply:
        ends = [e.event for e in iter_sse_lines(reply.iter_lines()) if e.event == "done"]
    assert ends == ["done"]
    # Charged what it used (a few tokens), the 100 fit now.
    deadline = time.time() + 10
    while (second := ask(a, 100)).status_code == 429 and time.time() < deadline:
        time.sleep(0.2)
    assert second.status_code == 202, second.text


def fair_records(client: redis.Redis) -> dict[str, int]:
    """What the fair order holds now, by kind of key (fairness.py)."""
    held: dict[str, int] = {}
    for key in client.scan_iter("textstream:queue:*:fair:*"):
        kind = key.decode().split(":fair:")[1].split(":")[0]
        size = {b"hash": client.hlen, b"zset": client.zcard}.get(client.type(key))
        held[kind] = held.get(kind, 0) + (size(key) if size else 1)
    return held


def test_cancelling_jobs_by_the_dozen_games_nothing_and_leaves_no_records(svc: Service):
    """A key that queues and cancels jobs by the dozen earns no place ahead of
    another key, and its cancelled jobs leave nothing in the fair order."""
    client = redis.Redis.from_url(svc.env["REDIS_URL"])
    a = {"Authorization": f"Bearer {KEYS['a']}"}
    blocker = post(svc, "c", 1000).json()["id"]  # 5 s: everything below waits (stopped below)
    with ThreadPoolExecutor(8) as pool:  # 48 requests, well within the blocker's 5 s
        for _ in range(2):
            ids = list(pool.map(lambda _: post(svc, "a", 50).json()["id"], range(12)))
            gone = pool.map(lambda job: httpx.delete(f"{svc.base}/jobs/{job}", headers=a), ids)
            assert {reply.status_code for reply in gone} == {202}
    held = fair_records(client)
    assert held.get("jobs", 0) == 0 and held.get("waiting", 0) == 0, held
    a_jobs = [post(svc, "a", 10).json()["id"] for _ in range(4)]
    b_jobs = [post(svc, "b", 10).json()["id"] for _ in range(4)]
    c = {"Authorization": f"Bearer {KEYS['c']}"}
    assert httpx.delete(f"{svc.base}/jobs/{blocker}", headers=c).status_code == 202
    times = {job: started_at(svc, "a", job) for job in a_jobs}
    times |= {job: started_at(svc, "b", job) for job in b_jobs}
    order = sorted(a_jobs + b_jobs, key=times.__getitem__)
    owners = "".join("a" if job in a_jobs else "b" for job in order)
    # Shared, not all of A's first: no run of more than two of one key.
    assert "aaa" not in owners and "bbb" not in owners, owners


def test_priority_bounds(svc: Service):
    for priority, status in ((-1000, 202), (1000, 202), (-1001, 422), (1001, 422), (0.5, 422)):
        reply = httpx.post(
            svc.base + "/jobs",
            json={"prompt": "Hi", "max_new_tokens": 1, "priority": priority},
            headers={"Authorization": f"Bearer {KEYS['c']}"},
            timeout=10,
        )
        assert reply.status_code == status, (priority, reply.text)


def test_the_order_rebuilds_itself_when_its_records_are_lost(svc: Service):
    """Redis losing the fair order (a restart without it) while jobs wait: each
    waiting job still runs, once, and new jobs are ordered fairly again."""
    client = redis.Redis.from_url(svc.env["REDIS_URL"])
    blocker = post(svc, "c", 300).json()["id"]
    waiting = [post(svc, "a", 10).json()["id"] for _ in range(5)]
    for key in client.scan_iter("textstream:queue:*:fair:*"):
        client.delete(key)
    later = [(who, post(svc, who, 10).json()["id"]) for who in "abab"]
    started_at(svc, "c", blocker)
    for job in waiting:
        events = events_of(svc, "a", job)
        assert sum(e.startswith("started") for e in events) == 1, events
        assert events[-1].startswith("done")
    for who, job in later:
        assert events_of(svc, who, job)[-1].startswith("done")
    assert fair_records(client).get("jobs", 0) == 0
