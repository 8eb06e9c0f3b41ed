"""The job stream reader against a real Redis, including the race where an empty
XREAD reply is handled only after the job has meanwhile ended."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from textstream.events import EventType, JobEvents


class LateEmptyReply(aioredis.Redis):
    """A client whose first blocking XREAD returns empty and only then lets the job
    run to its end: what a CPU-starved API process sees when the empty reply sits
    unread while the worker writes everything."""

    finish_job: object = None

    async def xread(self, streams, count=None, block=None):  # type: ignore[no-untyped-def]
        reply = await super().xread(streams, count=count, block=block)
        if block and not reply and self.finish_job is not None:
            finish, self.finish_job = self.finish_job, None
            await finish()  # type: ignore[operator]
        return reply


def test_reader_keeps_events_written_while_an_empty_reply_was_pending(redis_url):
    async def scenario() -> list[str]:
        client = LateEmptyReply.from_url(redis_url)
        jobs = JobEvents(client, ttl=60, maxlen=100)
        job_id = "late" + "0" * 28
        await client.delete(f"textstream:job:{job_id}:events", f"textstream:job:{job_id}:state")
        await jobs.append(job_id, EventType.QUEUED, {"job_id": job_id})

        async def finish() -> None:
            await jobs.append(job_id, EventType.STARTED, {"worker": "w"})
            await jobs.append(job_id, EventType.TOKEN, {"text": " hi"})
            await jobs.append(
                job_id, EventType.DONE, {"finish_reason": "length", "model": "m", "usage": {}}
            )

        client.finish_job = finish
        names = []
        async for event in jobs.read(job_id, block_ms=50):
            if event is not None:
                names.append(event.event)
        await client.close()
        return names

    assert asyncio.run(scenario()) == ["queued", "started", "token", "done"]


def test_reading_after_the_last_event_of_an_ended_job_returns_at_once(redis_url):
    async def scenario() -> list[object]:
        client = aioredis.Redis.from_url(redis_url)
        jobs = JobEvents(client, ttl=60, maxlen=100)
        job_id = "ended" + "0" * 27
        await jobs.append(job_id, EventType.QUEUED, {"job_id": job_id})
        await jobs.append(job_id, EventType.ERROR, {"error": {"type": "cancelled"}})
        last = (await jobs.history(job_id))[-1].id
        seen = [e async for e in jobs.read(job_id, after=last, block_ms=5000)]
        await client.close()
        return seen

    assert asyncio.run(asyncio.wait_for(scenario(), 2)) == []
