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
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from textstream import keys
from textstream.api.errors import RateLimitedError, UnauthorizedError
from textstream.config import Settings

#: An open stream that never reported its end stops counting after this long.
STREAM_SLOT_SECONDS = 3600
#: A stream token is ~110 characters; anything much longer is not one.
MAX_TOKEN_CHARS = 512


@dataclass(frozen=True)
class Caller:
    """Who is asking: `key:<hash>` or `ip:<address>`; never the key itself."""

    identity: str


def key_identity(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


class Guard:
    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self._settings = settings
        self._client = client
        self._keys = [k.encode() for k in settings.api_key_list]
        self._rate = client.register_script(RATE_SCRIPT)
        self._refund = client.register_script(REFUND_SCRIPT)
        self._slot = client.register_script(SLOT_SCRIPT)
        secret_material = b"textstream-stream-token\0" + b"\0".join(sorted(self._keys))
        self._secret = hashlib.sha256(secret_material).digest()

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

    async def open_stream(self, caller: Caller) -> str | None:
        """Take a stream slot (raises when the caller has too many); returns its id."""
        cap = self._settings.max_streams_per_key
        if not cap:
            return None
        key, slot, now = keys.open_streams(caller.identity), uuid.uuid4().hex, time.time()
        taken = await self._slot(keys=[key], args=[cap, slot, now, STREAM_SLOT_SECONDS])
        if not int(taken):
            raise RateLimitedError(f"more than {cap} open streams; close one first", 5)
        return slot

    async def close_stream(self, caller: Caller, slot: str | None) -> None:
        if slot:
            await self._client.zrem(keys.open_streams(caller.identity), slot)


#: KEYS: the caller's window. ARGV: limit, ttl. -1 (and nothing written) when full.
RATE_SCRIPT = """
if tonumber(redis.call('GET', KEYS[1]) or '0') >= tonumber(ARGV[1]) then return -1 end
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return count
"""

#: KEYS: the caller's window. A refused request gives its count back.
REFUND_SCRIPT = """
if redis.call('DECR', KEYS[1]) <= 0 then redis.call('DEL', KEYS[1]) end
"""

#: KEYS: the caller's open streams. ARGV: cap, slot, now, slot lifetime. Slots older
#: than their lifetime (a process that died holding them) stop counting.
SLOT_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[3]) - tonumber(ARGV[4]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""
