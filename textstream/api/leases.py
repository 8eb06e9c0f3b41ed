"""Leases, not lifetimes: what an API process holds in Redis on its callers' behalf
stops counting soon after the process dies (SIGKILL, the OOM killer, a lost host).

Every third of API_LEASE_SECONDS each process, in one round trip to the queue's
Redis, renews
- its own lease: its id in `keys.API_PROCESSES`, scored by when the lease lapses;
- the list of jobs it holds reader claims on (`keys.api_claims`: a /completion
  client whose leaving cancels its job; transport/events.ReaderClaims);
and its callers' stream slots (security.Guard.renew_leases).

Then it looks for processes whose lease lapsed, takes each off the list (one
process wins each), and drops all of that process's claims: a job nobody else
reads is cancelled and taken off the queue, as when its client leaves. A process
that restarts has a new id, so it inherits nothing. Expiries are Redis's clock.
"""

from __future__ import annotations

import asyncio
import logging

from textstream import keys
from textstream.api.deps import Services
from textstream.api.security import LUA_NOW
from textstream.connections import UNREACHABLE
from textstream.transport.events import CancelOutcome

log = logging.getLogger(__name__)

#: At most this many dead processes are reaped per round.
REAP_BATCH = 10

#: KEYS: the process list, this process's claims. ARGV: process id, lease seconds,
#: claims' ttl, then (job id, lapses at) pairs to add. Claims whose jobs are past
#: their deadline are dropped; the rest of the list is replaced by what is held now.
RENEW_SCRIPT = (
    LUA_NOW
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('DEL', KEYS[2])
for i = 4, #ARGV, 2 do redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i]) end
if #ARGV > 3 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
"""
)

#: KEYS: the process list. ARGV: how many. The processes whose lease lapsed, each
#: taken off the list here, so that exactly one live process reaps it.
REAP_SCRIPT = (
    LUA_NOW
    + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(dead) do redis.call('ZREM', KEYS[1], id) end
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

    async def renew(self) -> None:
        settings = self._services.settings
        claims = self._services.jobs.claims.current()
        pairs = [part for job_id, until in claims.items() for part in (job_id, until)]
        await self._renew(
            keys=[keys.API_PROCESSES, keys.api_claims(self.process_id)],
            args=[self.process_id, settings.api_lease_seconds, settings.job_ttl, *pairs],
        )
        await self._services.guard.renew_leases()

    async def reap(self) -> int:
        """Release the claims of processes whose lease lapsed; returns how many jobs
        that stopped."""
        client, jobs, stopped = self._services.redis, self._services.jobs, 0
        dead = await self._reap(keys=[keys.API_PROCESSES], args=[REAP_BATCH])
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
            log.warning(
                "API process %s stopped renewing its lease: released %d reader claim(s),"
                " %d job(s) stopped",
                process_id,
                len(held),
                stopped,
            )
        return stopped

    async def run(self) -> None:
        """Renew and reap every third of a lease, for ever (the app's lifespan runs
        it). A Redis outage is waited out: a lease missed then lapses, which errs
        towards freeing what was held."""
        period = self._services.settings.api_lease_seconds / 3
        while True:
            try:
                await self.renew()
                await self.reap()
            except UNREACHABLE as exc:
                log.warning("leases not renewed: %s", type(exc).__name__)
            await asyncio.sleep(period)

    async def close(self) -> None:
        """A clean stop: leave the list (the open streams were told to resume
        elsewhere, so their claims stay with their jobs)."""
        try:
            await self._services.redis.zrem(keys.API_PROCESSES, self.process_id)
            await self._services.redis.delete(keys.api_claims(self.process_id))
        except UNREACHABLE:
            pass
