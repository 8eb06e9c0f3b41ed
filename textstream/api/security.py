"""API keys, per-job stream tokens, and per-caller limits.

- `API_KEYS` set: every endpoint but `/health` and the page needs
  `Authorization: Bearer <key>` (what the OpenAI SDK sends). Keys are compared in
  constant time and never logged; a caller is known by a hash of its key.
- A browser EventSource cannot send headers: `POST /jobs` also returns a token,
  an HMAC over (job id, expiry, caller), accepted as `?access_token=` by that
  job's events endpoint only, for STREAM_TOKEN_SECONDS.
- Limits live in Redis, so they hold across API processes: RATE_LIMIT requests
  per minute (fixed one-minute windows) and MAX_STREAMS_PER_KEY open streams, per
  key, or per client IP when the API is open.
- An open stream's slot is a lease, not a lifetime: the API process holding it
  renews it every third of API_LEASE_SECONDS (`renew_leases`, one call per
  caller, from api/leases.py), so the slots of a process that died stop counting within that time,
  and a restarted process inherits none of them. Lease expiries are Redis's clock
  (TIME inside the scripts), so API hosts whose clocks disagree still agree on them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from textstream import keys
from textstream.api.errors import RateLimitedError, UnauthorizedError
from textstream.config import Settings
from textstream.fairness import SETTLE_TOKENS_SCRIPT

#: A stream token is ~110 characters; anything much longer is not one.
MAX_TOKEN_CHARS = 512


@dataclass(frozen=True)
class Caller:
    """Who is asking: `key:<hash>` or `ip:<address>`; never the key itself. And how
    long this request will wait in the queue for a worker (`X-Queue-Timeout`; a
    body's `queue_timeout` wins), which is not part of who it is."""

    identity: str
    queue_timeout: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TokenHold:
    """Tokens a request reserved in a minute's window of TOKEN_RATE_LIMIT."""

    key: str
    tokens: int


@dataclass(frozen=True)
class RateUsage:
    """A caller's requests and tokens counted this minute, and the seconds left."""

    requests: int
    tokens: int
    reset_seconds: float


def key_identity(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


class Guard:
    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self._settings = settings
        self._client = client
        self._keys = [k.encode() for k in settings.api_key_list]
        self._rate = client.register_script(RATE_SCRIPT)
        self._tokens = client.register_script(TOKENS_SCRIPT)
        self._settle_tokens = client.register_script(SETTLE_TOKENS_SCRIPT)
        self._refund = client.register_script(REFUND_SCRIPT)
        self._slot = client.register_script(SLOT_SCRIPT)
        self._renew = client.register_script(RENEW_SCRIPT)
        secret_material = b"textstream-stream-token\0" + b"\0".join(sorted(self._keys))
        self._secret = hashlib.sha256(secret_material).digest()
        #: The stream slots this process holds, by caller identity: what it renews.
        self._held: dict[str, set[str]] = {}

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def _matching_key(self, presented: str) -> bytes | None:
        """Compare against every key, always all of them, in constant time each."""
        candidate, found = presented.encode(), None
        for key in self._keys:
            if hmac.compare_digest(candidate, key):
                found = key
        return found

    def identify(
        self, authorization: str | None, client_ip: str, job_id: str = "", token: str = ""
    ) -> Caller:
        if not self.enabled:
            return Caller("ip:" + client_ip)
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and presented:
            key = self._matching_key(presented.strip())
            if key is not None:
                return Caller(key_identity(key.decode()))
        if authorization:
            # A credential presented must be right, whatever else the request carries
            # (a stream token is for an EventSource, which sends no Authorization).
            raise UnauthorizedError("invalid API key (Authorization: Bearer <key>)")
        if job_id and token:
            identity = self._check_stream_token(token, job_id)
            if identity:
                return Caller(identity)
        raise UnauthorizedError("missing or invalid API key (Authorization: Bearer <key>)")

    # -- stream tokens ----------------------------------------------------------

    def _sign(self, message: str) -> str:
        digest = hmac.new(self._secret, message.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def stream_token(self, job_id: str, caller: Caller) -> str | None:
        if not self.enabled:
            return None
        expires = int(time.time()) + self._settings.stream_token_seconds
        message = f"{job_id}.{expires}.{caller.identity}"
        return f"{message}.{self._sign(message)}"

    def _check_stream_token(self, token: str, job_id: str) -> str | None:
        """The identity a token was issued to, if it is ours, for this job, unexpired.
        Any other text (non-ASCII, oversized, malformed) is simply not a token."""
        if len(token) > MAX_TOKEN_CHARS:
            return None
        message, _, signature = token.rpartition(".")
        parts = message.split(".")
        # Bytes, not str: compare_digest refuses non-ASCII str (a 500 otherwise).
        expected = self._sign(message).encode()
        if len(parts) != 3 or not hmac.compare_digest(signature.encode(), expected):
            return None
        token_job, expires, identity = parts
        if token_job != job_id or not (expires.isascii() and expires.isdigit()):
            return None
        return identity if int(expires) >= time.time() else None

    # -- limits -----------------------------------------------------------------
    # Each check and its count are one script: a refusal writes nothing, and N
    # concurrent requests cannot all pass a check made before any of them counted.

    async def count_request(self, caller: Caller) -> Callable[[], Awaitable[None]] | None:
        """Count the request against RATE_LIMIT (raises past it); returns how to take
        the count back if the request is then refused, or None when not counted."""
        limit = self._settings.rate_limit
        if not limit:
            return None
        now = time.time()
        key = keys.rate_window(caller.identity, int(now // 60))
        if int(await self._rate(keys=[key], args=[limit, 120])) < 0:
            retry_after = max(1, int(60 - now % 60))
            raise RateLimitedError(f"more than {limit} requests a minute; retry later", retry_after)

        async def refund() -> None:
            await self._refund(keys=[key])

        return refund

    async def reserve_tokens(self, caller: Caller, tokens: int) -> TokenHold | None:
        """Reserve `tokens` (a request's prompt and max_tokens) in the caller's
        minute of TOKEN_RATE_LIMIT (raises past it); None when there is no limit.
        The worker replaces the reservation by what the job used (worker/queue.py)."""
        limit = self._settings.token_rate_limit
        if not limit:
            return None
        now = time.time()
        key = keys.token_window(caller.identity, int(now // 60))
        if int(await self._tokens(keys=[key], args=[tokens, limit, 120])) < 0:
            raise RateLimitedError(
                f"more than {limit} tokens a minute (this request may use {tokens}); retry later",
                max(1, int(60 - now % 60)),
            )
        return TokenHold(key, tokens)

    async def release_tokens(self, hold: TokenHold | None) -> None:
        """Give a reservation back (the request was refused, or answered from cache)."""
        if hold is not None:
            await self._settle_tokens(keys=[hold.key], args=[-hold.tokens])

    async def usage(self, caller: Caller) -> RateUsage:
        """This minute's counts for the x-ratelimit-* headers (one read)."""
        now = time.time()
        window = int(now // 60)
        requests, tokens = await self._client.mget(
            keys.rate_window(caller.identity, window), keys.token_window(caller.identity, window)
        )
        return RateUsage(int(requests or 0), int(tokens or 0), 60 - now % 60)

    async def open_stream(self, caller: Caller) -> str | None:
        """Take a stream slot (raises when the caller has too many); returns its id.
        The slot is a lease this process renews until `close_stream`."""
        cap = self._settings.max_streams_per_key
        if not cap:
            return None
        key, slot = keys.open_streams(caller.identity), uuid.uuid4().hex
        lease = self._settings.api_lease_seconds
        if not int(await self._slot(keys=[key], args=[cap, slot, lease])):
            raise RateLimitedError(f"more than {cap} open streams; close one first", 5)
        self._held.setdefault(caller.identity, set()).add(slot)
        return slot

    async def close_stream(self, caller: Caller, slot: str | None) -> None:
        if not slot:
            return
        held = self._held.get(caller.identity)
        if held is not None:
            held.discard(slot)
            if not held:
                del self._held[caller.identity]
        await self._client.zrem(keys.open_streams(caller.identity), slot)

    async def renew_leases(self) -> int:
        """Push the expiry of every slot this process holds one lease further, in one
        pipelined call per caller; returns how many slots were renewed. A slot that
        expired meanwhile (Redis was away longer than a lease) is not added back:
        the caller may then briefly hold one stream more than its cap."""
        held = [(identity, sorted(slots)) for identity, slots in self._held.items() if slots]
        if not held:
            return 0
        lease = self._settings.api_lease_seconds
        async with self._client.pipeline(transaction=False) as pipe:
            for identity, slots in held:
                await self._renew(
                    keys=[keys.open_streams(identity)], args=[lease, *slots], client=pipe
                )
            await pipe.execute()
        return sum(len(slots) for _, slots in held)


#: KEYS: the caller's window. ARGV: limit, ttl. -1 (and nothing written) when full.
RATE_SCRIPT = """
if tonumber(redis.call('GET', KEYS[1]) or '0') >= tonumber(ARGV[1]) then return -1 end
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return count
"""

#: KEYS: the caller's token window. ARGV: tokens to reserve, the limit, TTL.
TOKENS_SCRIPT = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return -1 end
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return total
"""

#: KEYS: the caller's window. A refused request gives its count back.
REFUND_SCRIPT = """
if redis.call('DECR', KEYS[1]) <= 0 then redis.call('DEL', KEYS[1]) end
"""

#: Redis's clock in seconds, inside a script. TIME before a write needs effects
#: replication: the default from Redis 5, asked for explicitly for older servers.
LUA_NOW = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

#: KEYS: the caller's open streams, scored by lease expiry. ARGV: cap, slot, lease
#: seconds. Expired leases (a process that died holding them) stop counting.
SLOT_SCRIPT = (
    LUA_NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])) + 1)
return 1
"""
)

#: KEYS: the caller's open streams. ARGV: lease seconds, then the slots to renew
#: (only those still there: XX).
RENEW_SCRIPT = (
    LUA_NOW
    + """
local expiry = now + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i]) end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
"""
)
