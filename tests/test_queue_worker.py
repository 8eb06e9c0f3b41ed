"""The worker's side of the queue, in process against a real Redis: our claim loop
over ModelQ's records (worker/queue.WorkerModelQ) and the gathered metrics writes
(metrics.JobMetrics)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from helpers import wait_for
from modelq.app.tasks import Task

from bench.cluster import start_redis
from textstream import keys
from textstream.api.queue import JobQueue
from textstream.config import Settings
from textstream.job import CompletionJob
from textstream.worker.metrics import JobMetrics, JobTimings
from textstream.worker.queue import create_worker_modelq, new_server_id

MODEL = "queue-test"


def submit(url: str, prompt: str) -> str:
    """Queue a job as the API does; its id."""
    settings = Settings(redis_url=url)

    async def put() -> str:
        client = aioredis.Redis.from_url(url)
        try:
            job = CompletionJob(
                job_id=uuid.uuid4().hex,
                model=MODEL,
                prompt=prompt,
                enqueued_at=time.time(),
            )
            assert await JobQueue(client, settings).submit(job) is not None
            return job.job_id
        finally:
            await client.close()

    return asyncio.run(put())


def start_worker(url: str, run: Any) -> Any:
    settings = Settings(redis_url=url, takeover_after_seconds=30)
    mq = create_worker_modelq(settings, new_server_id(), MODEL, run)
    mq.start_workers(1)
    return mq


def scoped(name: str) -> str:
    return keys.queue_key(MODEL, name)


def test_a_finished_job_leaves_only_a_payload_free_stub(isolated_redis_url):
    client = redis.Redis.from_url(isolated_redis_url)
    ran: list[CompletionJob] = []
    seen_while_running: dict[str, Any] = {}

    def run(job: CompletionJob) -> dict[str, Any]:
        # While it runs, ModelQ's records say so: a sweeper must leave it alone.
        seen_while_running["processing"] = client.smembers(scoped("processing_tasks"))
        seen_while_running["beat"] = client.hget(scoped("task_heartbeats"), job.job_id)
        record = json.loads(client.get(keys.modelq_task(job.job_id)))
        seen_while_running["record"] = record
        ran.append(job)
        return {"status": "done"}

    job_id = submit(isolated_redis_url, "a secret prompt")
    mq = start_worker(isolated_redis_url, run)
    try:
        wait_for(lambda: ran and not client.smembers(scoped("processing_tasks")), 10, "the job")
    finally:
        mq.stop()
    assert [job.prompt for job in ran] == ["a secret prompt"]
    assert seen_while_running["processing"] == {job_id.encode()}
    assert seen_while_running["beat"] is not None
    record = seen_while_running["record"]
    assert record["status"] == "processing" and record["started_at"] > 0
    assert record["payload"]["data"]["prompt"] == "a secret prompt"  # a sweeper can requeue it
    # Released: nothing in custody, no heartbeat, not queued, and the prompt gone.
    wait_for(lambda: not any(client.lrange(k, 0, -1) for k in client.keys("inflight:*")), 5, "")
    assert not client.hget(scoped("task_heartbeats"), job_id)
    assert client.zcard(scoped("queued_requests")) == 0
    assert client.llen(scoped("ml_tasks")) == 0
    stub = client.get(keys.modelq_task(job_id))
    assert b"secret" not in stub and json.loads(stub)["status"] == "completed"
    assert 0 < client.ttl(keys.modelq_task(job_id)) <= 3600


def test_a_job_another_worker_is_running_is_not_run_twice(isolated_redis_url):
    """A task given back while its worker still runs it (a late heartbeat) and
    claimed again: the second claim runs nothing and leaves the first worker's
    records as they are."""
    client = redis.Redis.from_url(isolated_redis_url)
    job_id = submit(isolated_redis_url, "twice")
    beat = str(time.time())  # fresh: the sweepers leave the running job alone
    client.sadd(scoped("processing_tasks"), job_id)
    client.hset(scoped("task_heartbeats"), job_id, beat)
    ran: list[str] = []
    mq = start_worker(isolated_redis_url, lambda job: ran.append(job.job_id))
    try:
        wait_for(lambda: client.llen(scoped("ml_tasks")) == 0, 10, "the claim")
        wait_for(lambda: not any(client.lrange(k, 0, -1) for k in client.keys("inflight:*")), 5, "")
        time.sleep(0.3)
    finally:
        mq.stop()
    assert ran == []
    assert client.smembers(scoped("processing_tasks")) == {job_id.encode()}
    assert client.hget(scoped("task_heartbeats"), job_id) == beat.encode()


def test_a_job_whose_run_raises_is_released_as_failed(isolated_redis_url):
    client = redis.Redis.from_url(isolated_redis_url)
    job_id = submit(isolated_redis_url, "boom")

    def run(job: CompletionJob) -> dict[str, Any]:
        raise RuntimeError("the prompt must not reach the log: boom")

    def failed() -> bool:
        return b'"failed"' in (client.get(keys.modelq_task(job_id)) or b"")

    mq = start_worker(isolated_redis_url, run)
    try:
        wait_for(failed, 10, "the failed stub")
    finally:
        mq.stop()
    assert not client.smembers(scoped("processing_tasks"))
    assert b"boom" not in client.get(keys.modelq_task(job_id))


def timings(tokens: int) -> JobTimings:
    now = time.time()
    return JobTimings(
        enqueued_at=now - 1,
        started_at=now - 0.5,
        token_times=[now - 0.4 + 0.01 * i for i in range(tokens)],
        prompt_tokens=3,
        completion_tokens=tokens,
    )


def counters(client: redis.Redis) -> dict[bytes, bytes]:
    return client.hgetall(keys.METRICS_COUNTERS)


def test_job_metrics_go_at_once_alone_and_together_in_a_burst(isolated_redis_url):
    client = redis.Redis.from_url(isolated_redis_url)
    writes: list[float] = []
    metrics = JobMetrics(client, every=0.5, after_write=lambda: writes.append(time.monotonic()))
    metrics.add(timings(4), True, "m")
    # A lone job: in Redis before `add` returns.
    assert counters(client)[b"generation_tokens|m"] == b"4"
    assert len(writes) == 1
    for _ in range(20):  # a burst within the window: gathered, one write
        metrics.add(timings(2), True, "m")
    metrics.add(timings(1), False, "m")
    assert counters(client)[b"generation_tokens|m"] == b"4"
    wait_for(lambda: counters(client).get(b"request_failure|m") == b"1", 5, "the gathered write")
    assert len(writes) == 2 and writes[1] - writes[0] >= 0.45
    found = counters(client)
    assert found[b"generation_tokens|m"] == b"45"
    assert found[b"request_success|m"] == b"21"
    assert found[b"prompt_tokens|m"] == b"66"
    ttft = client.hgetall(keys.metrics_histogram("time_to_first_token_seconds", "m"))
    assert ttft[b"count"] == b"22" and abs(float(ttft[b"sum"]) - 22 * 0.6) < 0.05
    itl = client.hgetall(keys.metrics_histogram("inter_token_latency_seconds", "m"))
    assert itl[b"count"] == str(3 + 20).encode()


def test_job_metrics_outlive_a_redis_outage(tmp_path: Path):
    proc, url = start_redis(tmp_path)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    metrics = JobMetrics(client, every=0.2)
    try:
        proc.terminate()
        proc.wait(10)
        metrics.add(timings(5), True, "m")  # Redis gone: kept, never raised
        metrics.add(timings(6), True, "m")
        time.sleep(0.5)
        proc, _ = start_redis(tmp_path, port)  # back, and empty
        wait_for(lambda: counters(client).get(b"generation_tokens|m") == b"11", 10, "the retry")
        assert counters(client)[b"request_success|m"] == b"2"
    finally:
        proc.terminate()
        proc.wait(10)
        client.close()


def test_job_metrics_are_counted_once_under_concurrent_adds(isolated_redis_url):
    client = redis.Redis.from_url(isolated_redis_url)
    metrics = JobMetrics(client, every=0.05)
    threads = [
        threading.Thread(target=lambda: [metrics.add(timings(1), True, "m") for _ in range(50)])
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_for(lambda: counters(client).get(b"request_success|m") == b"400", 5, "all 400 jobs")
    time.sleep(0.2)
    assert counters(client)[b"generation_tokens|m"] == b"400"


def test_a_claim_whose_reply_was_lost_still_runs_its_task(isolated_redis_url):
    """BLMOVE moved the task into the thread's custody list, and the reply never
    came back (a connection reset): the thread looks there before claiming again."""
    client = redis.Redis.from_url(isolated_redis_url)
    job_id = submit(isolated_redis_url, "lost reply")
    ran: list[str] = []
    settings = Settings(redis_url=isolated_redis_url, takeover_after_seconds=30)
    mq = create_worker_modelq(settings, new_server_id(), MODEL, lambda job: ran.append(job.job_id))
    claim = mq._claim_task
    lost = []

    def claim_losing_the_first_reply(inflight_key: str) -> Any:
        if not lost:
            lost.append(client.lmove(scoped("ml_tasks"), inflight_key, "LEFT", "RIGHT"))
            raise redis.ConnectionError("Connection reset by peer")
        return claim(inflight_key)

    mq._claim_task = claim_losing_the_first_reply
    mq.start_workers(1)
    try:
        wait_for(lambda: ran, 10, "the job in custody to run")
        wait_for(lambda: not any(client.lrange(k, 0, -1) for k in client.keys("inflight:*")), 5, "")
    finally:
        mq.stop()
    assert lost and ran == [job_id]
    assert json.loads(client.get(keys.modelq_task(job_id)))["status"] == "completed"


def test_a_queue_thread_waits_out_redis_and_serves_on(tmp_path: Path):
    """Redis goes away while a job runs: its release is retried until Redis is back
    (here empty), and the thread then claims and runs the next job."""
    proc, url = start_redis(tmp_path)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    started, go_on, ran = threading.Event(), threading.Event(), []

    def run(job: CompletionJob) -> dict[str, Any]:
        started.set()
        go_on.wait(10)
        ran.append(job.prompt)
        return {"status": "done"}

    settings = Settings(redis_url=url, takeover_after_seconds=30, redis_timeout=1)
    mq = create_worker_modelq(settings, new_server_id(), MODEL, run)
    mq.RETRY_SECONDS = 0.2
    try:
        submit(url, "first")
        mq.start_workers(1)
        assert started.wait(10)
        proc.terminate()
        proc.wait(10)
        go_on.set()  # the job ends while Redis is down
        wait_for(lambda: ran == ["first"], 5, "the first job to end")
        time.sleep(1.0)
        proc, _ = start_redis(tmp_path, port)
        client = redis.Redis.from_url(url)
        # Back empty: the first job's custody entry went with the data, so its release
        # (retried until Redis answered) found nothing to release, and wrote nothing.
        second = submit(url, "second")
        wait_for(lambda: ran == ["first", "second"], 15, "the next job")
        wait_for(lambda: b"completed" in (client.get(keys.modelq_task(second)) or b""), 5, "")
    finally:
        mq.stop()
        for thread in mq.worker_threads:  # before Redis goes: ModelQ's calls retry forever
            thread.join(10)
        proc.terminate()
        proc.wait(10)


def test_an_entry_that_is_not_a_task_is_dropped_and_the_queue_goes_on(isolated_redis_url):
    client = redis.Redis.from_url(isolated_redis_url)
    for garbage in (b"not json", b"[1, 2]", b'{"task_id": "x"}'):
        client.rpush(scoped("ml_tasks"), garbage)
    ran: list[str] = []
    mq = start_worker(isolated_redis_url, lambda job: ran.append(job.prompt))
    try:
        job_id = submit(isolated_redis_url, "after the garbage")
        wait_for(lambda: ran == ["after the garbage"], 10, "the real job")
        wait_for(lambda: not any(client.lrange(k, 0, -1) for k in client.keys("inflight:*")), 5, "")
    finally:
        mq.stop()
    assert client.llen(scoped("ml_tasks")) == 0
    assert json.loads(client.get(keys.modelq_task(job_id)))["status"] == "completed"


def test_a_task_of_another_name_is_dropped_not_circled(isolated_redis_url):
    client = redis.Redis.from_url(isolated_redis_url)
    alien = {
        "task_id": "a" * 32,
        "task_name": "render_video",
        "payload": {"data": {}},
        "status": "queued",
    }
    client.rpush(scoped("ml_tasks"), json.dumps(alien))
    ran: list[str] = []
    mq = start_worker(isolated_redis_url, lambda job: ran.append(job.prompt))
    try:
        submit(isolated_redis_url, "ours")
        wait_for(lambda: ran == ["ours"], 10, "our job")
        time.sleep(0.5)
    finally:
        mq.stop()
    assert client.llen(scoped("ml_tasks")) == 0
    assert not any(client.lrange(k, 0, -1) for k in client.keys("inflight:*"))


def test_a_job_marked_processing_by_a_worker_gone_is_taken_over(isolated_redis_url):
    """Marked processing with a stale heartbeat (its worker died, or a sweeper is
    giving it back in several steps): nobody runs it, so this claim does."""
    client = redis.Redis.from_url(isolated_redis_url)
    job_id = submit(isolated_redis_url, "orphan")
    client.sadd(scoped("processing_tasks"), job_id)
    client.hset(scoped("task_heartbeats"), job_id, str(time.time() - 100))
    ran: list[str] = []
    mq = start_worker(isolated_redis_url, lambda job: ran.append(job.job_id))
    try:
        wait_for(lambda: ran == [job_id], 10, "the orphan to run")
        wait_for(lambda: not client.smembers(scoped("processing_tasks")), 5, "its release")
    finally:
        mq.stop()


def test_a_retried_begin_is_its_own_earlier_try_and_a_late_release_changes_nothing(
    isolated_redis_url,
):
    client = redis.Redis.from_url(isolated_redis_url)
    settings = Settings(redis_url=isolated_redis_url, takeover_after_seconds=30)
    mq = create_worker_modelq(settings, new_server_id(), MODEL, lambda job: None)
    job_id = uuid.uuid4().hex
    begin_keys = [
        "processing_tasks",
        keys.MODELQ_QUEUED_INDEX,
        keys.modelq_task(job_id),
        mq.INFLIGHT_HEARTBEAT_KEY,
    ]
    started = repr(time.time())
    args = [job_id, "{}", 60, started, 30]
    assert mq._begin(keys=begin_keys, args=args) == 1
    # Its reply lost, the same call again: still ours (not "running elsewhere").
    assert mq._begin(keys=begin_keys, args=args) == 1
    # Another claimer now, with the heartbeat fresh: a duplicate.
    assert mq._begin(keys=begin_keys, args=[job_id, "{}", 60, repr(time.time()), 30]) == 0
    # A worker whose task was given back (its custody entry gone) releases late:
    # the records are the new claimer's now, and stay.
    task = Task(task_name=keys.TASK_NAME, payload={}, task_id=job_id)
    mq._release("inflight:gone:0", b"entry", task)
    assert client.smembers(scoped("processing_tasks")) == {job_id.encode()}
    assert client.hget(scoped("task_heartbeats"), job_id) == started.encode()
    assert client.get(keys.modelq_task(job_id)) == b"{}"


def test_job_metrics_leave_out_figures_that_are_not_finite(isolated_redis_url):
    """A clock stepped mid-job gives a negative or non-finite figure: it is left
    out, and the job's other figures (and other jobs') still count."""
    client = redis.Redis.from_url(isolated_redis_url)
    metrics = JobMetrics(client, every=0.05)
    for bad in (float("nan"), float("inf"), -float("inf"), 1e300, -5.0):
        odd = timings(3)
        odd.enqueued_at = bad
        metrics.add(odd, True, "m")
        time.sleep(0.06)
    metrics.add(timings(2), True, "m")
    wait_for(lambda: counters(client).get(b"request_success|m") == b"6", 5, "all six jobs")
    ttft = client.hgetall(keys.metrics_histogram("time_to_first_token_seconds", "m"))
    itl = client.hgetall(keys.metrics_histogram("inter_token_latency_seconds", "m"))
    # Of the odd jobs' times to first token only enqueued_at -5.0's is finite and
    # >= 0 (a huge one, in the last bucket); with the good job's, two.
    assert ttft[b"count"] == b"2"
    assert itl[b"count"] == str(5 * 2 + 1).encode()  # every job's own token gaps
    assert counters(client)[b"generation_tokens|m"] == b"17"


#: A worker on a host whose clock is 100 s behind: it claims the one job and runs
#: it for 8 s (printing "running" when it starts).
SLOW_CLOCK_WORKER = """
import sys, time
real = time.time
time.time = lambda: real() - 100
from textstream.config import Settings
from textstream.worker.queue import create_worker_modelq, new_server_id

def run(job):
    print("running", flush=True)
    time.sleep(8)
    return {"status": "done"}

settings = Settings(redis_url=sys.argv[1], takeover_after_seconds=1.5)
create_worker_modelq(settings, new_server_id(), sys.argv[2], run).start_workers(1)
time.sleep(30)
"""


def test_hosts_whose_clocks_disagree_agree_on_a_live_worker_heartbeat(isolated_redis_url):
    """Heartbeats are stamped and aged on Redis's clock: a sweeper on a host 100 s
    ahead of the running worker's (on its own clocks, a heartbeat 100 s old) leaves
    the running job alone, and still gives back one whose worker is gone."""
    import subprocess
    import sys

    from bench.cluster import REPO

    client = redis.Redis.from_url(isolated_redis_url)
    job_id = submit(isolated_redis_url, "a long job")
    worker = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLOCK_WORKER, isolated_redis_url, MODEL],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    sweeper = None
    try:
        assert worker.stdout is not None and worker.stdout.readline() == "running\n"
        settings = Settings(redis_url=isolated_redis_url, takeover_after_seconds=1.5)
        sweeper = create_worker_modelq(settings, new_server_id(), MODEL, lambda job: {})
        sweeper.start_workers(0)  # its heartbeat and sweep threads only: it claims nothing
        seconds, micros = client.time()
        beat = float(client.hget(scoped("task_heartbeats"), job_id))
        assert abs(seconds + micros / 1e6 - beat) < 1  # Redis's clock, not the worker's
        for _ in range(12):  # 3 s: two takeover windows, twelve sweeps
            time.sleep(0.25)
            assert client.llen(scoped("ml_tasks")) == 0, "a live worker's job was given back"
            assert client.smembers(scoped("processing_tasks")) == {job_id.encode()}
        worker.kill()  # now it is gone: its job goes back to the queue
        worker.wait(10)
        wait_for(lambda: client.llen(scoped("ml_tasks")) == 1, 5, "the dead worker's job back")
    finally:
        worker.kill()
        if sweeper is not None:
            sweeper.stop()


def test_a_failed_heartbeat_is_written_again_at_the_next_tick(isolated_redis_url):
    """A Redis error on one in-flight heartbeat must not pause the beats (a pause of
    TAKEOVER_AFTER_SECONDS gives the running job away): the next tick writes it."""
    client = redis.Redis.from_url(isolated_redis_url)
    release = threading.Event()
    started = threading.Event()

    def run(job: CompletionJob) -> dict[str, Any]:
        started.set()
        release.wait(10)
        return {"status": "done"}

    job_id = submit(isolated_redis_url, "beat through a blip")
    settings = Settings(redis_url=isolated_redis_url, takeover_after_seconds=1.5)
    mq = create_worker_modelq(settings, new_server_id(), MODEL, run)
    publish, failures = mq._publish_inflight_heartbeats, []

    def flaky() -> None:
        if len(failures) < 3:  # three beats in a row fail: 0.75 s
            failures.append(time.monotonic())
            raise redis.ConnectionError("a blip")
        publish()

    mq._publish_inflight_heartbeats = flaky
    mq.start_workers(1)
    try:
        assert started.wait(10)
        wait_for(lambda: len(failures) == 3, 5, "the failing beats")
        wait_for(
            lambda: (
                float(client.hget(scoped("task_heartbeats"), job_id) or 0)
                > float(client.time()[0]) - 0.5
            ),
            1.0,
            "a beat right after the blip",
        )
        assert client.llen(scoped("ml_tasks")) == 0  # never given back
    finally:
        release.set()
        mq.stop()
