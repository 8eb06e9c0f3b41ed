"""Leases, not lifetimes: what an API process holds in Redis on its callers' behalf
stops counting soon after the process dies (SIGKILL, the OOM killer, a lost host).

Every third of API_LEASE_SECONDS each process, in one round trip to the queue's
Redis, renews
- its own lease: its id in `keys.API_PROCESSES`, scored by when the lease lapses;
- the list of jobs it holds reader claims on (`keys.api_claims`: a /completion
  client whose leaving cancels its job; api/relay/job_events.ReaderClaims);
and its callers' stream slots (security.Guard.renew_leases).

Claims taken since the last renewal are published within PUBLISH_SECONDS, one
call for a burst of them.

On a timer of its own, so that reaping never delays a renewal, it looks for
processes whose lease lapsed and takes each for one lease (one process wins each;
one that dies while reaping leaves it to the next), drops all of that process's
claims (a job nobody else reads is cancelled and taken off the queue, as when its
client leaves), and only then removes it. A process that restarts has a new id,
so it inherits nothing. Expiries are Redis's clock. A clean stop leaves the list
and keeps its claims with their jobs: its streams were told to resume elsewhere.
"""

from __future__ import annotations

import asyncio
import logging

from textstream import keys
from textstream.api.deps import Services
from textstream.api.relay.job_events import CancelOutcome
from textstream.api.security import LUA_NOW
from textstream.connections import UNREACHABLE

log = logging.getLogger(__name__)

#: At most this many dead processes are reaped per round.
REAP_BATCH = 10
#: Claims taken since the last renewal are published within this long.
PUBLISH_SECONDS = 0.5

#: KEYS: the process list, this process's claims. ARGV: process id, lease seconds,
#: claims' ttl, then (job id, lapses at) pairs to add. Claims whose jobs are past
#: their deadline are dropped; the rest of the list is replaced by what is held now.
RENEW_SCRIPT = (
    LUA_NOW
    + """
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('DEL', KEYS[2])
for i = 4, #ARGV, 2 do redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i]) end
if #ARGV > 3 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
if known then return 1 end
return 0
"""
)

#: KEYS: the process list. ARGV: how many, lease seconds. The processes whose lease
#: lapsed, each given one more lease here, so that exactly one live process reaps it
#: (and, should that one die too, another after it). Removed once reaped.
REAP_SCRIPT = (
    LUA_NOW
    + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(dead) do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id) end
return dead
"""
)


class Leases:
    def __init__(self, services: Services) -> None:
        self._services = services
        client = services.redis
        self._renew = client.register_script(RENEW_SCRIPT)
        self._reap = client.register_script(REAP_SCRIPT)
        self.process_id = services.jobs.claims.process_id
        self._renewed = False

    async def renew(self) -> None:
        settings, claims = self._services.settings, self._services.jobs.claims
        held = claims.current()
        claims.published()
        pairs = [part for job_id, until in held.items() for part in (job_id, until)]
        known = await self._renew(
            keys=[keys.API_PROCESSES, keys.api_claims(self.process_id)],
            args=[self.process_id, settings.api_lease_seconds, settings.job_ttl, *pairs],
        )
        if self._renewed and not int(known):
            log.warning(  # its claims may have been released under its readers
                "this API process's lease had lapsed (Redis unreachable or restarted"
                " empty, or the process stalled for API_LEASE_SECONDS); renewed now"
            )
        self._renewed = True
        await self._services.guard.renew_leases()

    async def reap(self) -> int:
        """Release the claims of processes whose lease lapsed; returns how many jobs
        that stopped."""
        client, jobs, stopped = self._services.redis, self._services.jobs, 0
        lease = self._services.settings.api_lease_seconds
        dead = await self._reap(keys=[keys.API_PROCESSES], args=[REAP_BATCH, lease])
        for raw in dead:
            process_id = raw.decode() if isinstance(raw, bytes) else str(raw)
            held = await client.zrange(keys.api_claims(process_id), 0, -1)
            for member in held:
                job_id = member.decode() if isinstance(member, bytes) else str(member)
                if await jobs.release_all(job_id, process_id) is CancelOutcome.CANCELLED:
                    access = await jobs.access(job_id)
                    await self._services.queue.withdraw(job_id, access.model)
                    stopped += 1
            await client.delete(keys.api_claims(process_id))
            await client.zrem(keys.API_PROCESSES, process_id)
            log.warning(
                "API process %s stopped renewing its lease: released %d reader claim(s),"
                " %d job(s) stopped",
                process_id,
                len(held),
                stopped,
            )
        return stopped

    async def run(self) -> None:
        """Renew every third of a lease (sooner when new claims wait to be published)
        and reap on a timer of its own, for ever (the app's lifespan runs it). A
        Redis outage is waited out: a lease missed then lapses, which errs towards
        freeing what was held."""
        reaping = asyncio.create_task(self._reap_forever())
        try:
            await self._renew_forever()
        finally:
            reaping.cancel()

    async def _renew_forever(self) -> None:
        period, claims = self._services.settings.api_lease_seconds / 3, self._services.jobs.claims
        while True:
            try:
                await self.renew()
            except UNREACHABLE as exc:
                log.warning("leases not renewed: %s", type(exc).__name__)
            waited = 0.0
            while waited < period and not claims.unpublished:
                await asyncio.sleep(PUBLISH_SECONDS)
                waited += PUBLISH_SECONDS

    async def _reap_forever(self) -> None:
        period = self._services.settings.api_lease_seconds / 3
        while True:
            try:
                await self.reap()
            except UNREACHABLE as exc:
                log.warning("dead API processes not reaped: %s", type(exc).__name__)
            await asyncio.sleep(period)

    async def close(self) -> None:
        """A clean stop: leave the list, its claims with their jobs (the open streams
        were told to resume elsewhere, at /jobs/{id}/events, which takes no claim:
        a reaper would cancel the job under them)."""
        try:
            await self._services.redis.zrem(keys.API_PROCESSES, self.process_id)
            await self._services.redis.delete(keys.api_claims(self.process_id))
        except UNREACHABLE:
            pass
