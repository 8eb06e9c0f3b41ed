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
from dataclasses import dataclass

import redis.asyncio as aioredis

from textstream import keys
from textstream.api.errors import RateLimitedError, UnauthorizedError
from textstream.config import Settings

#: An open stream that never reported its end stops counting after this long.
STREAM_SLOT_SECONDS = 3600


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
        message, _, signature = token.rpartition(".")
        parts = message.split(".")
        if len(parts) != 3 or not hmac.compare_digest(signature, self._sign(message)):
            return None
        token_job, expires, identity = parts
        if token_job != job_id or not expires.isdigit() or int(expires) < time.time():
            return None
        return identity

    # -- limits -----------------------------------------------------------------

    async def count_request(self, caller: Caller) -> None:
        limit = self._settings.rate_limit
        if not limit:
            return
        now = time.time()
        window = int(now // 60)
        key = keys.rate_window(caller.identity, window)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 120)
            count, _ = await pipe.execute()
        if count > limit:
            retry_after = max(1, int(60 - now % 60))
            raise RateLimitedError(f"more than {limit} requests a minute; retry later", retry_after)

    async def open_stream(self, caller: Caller) -> str | None:
        """Take a stream slot (raises when the caller has too many); returns its id."""
        cap = self._settings.max_streams_per_key
        if not cap:
            return None
        key, slot, now = keys.open_streams(caller.identity), uuid.uuid4().hex, time.time()
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, "-inf", now - STREAM_SLOT_SECONDS)
            pipe.zadd(key, {slot: now})
            pipe.zcard(key)
            pipe.expire(key, STREAM_SLOT_SECONDS)
            _, _, count, _ = await pipe.execute()
        if count > cap:
            await self._client.zrem(key, slot)
            raise RateLimitedError(f"more than {cap} open streams; close one first", 5)
        return slot

    async def close_stream(self, caller: Caller, slot: str | None) -> None:
        if slot:
            await self._client.zrem(keys.open_streams(caller.identity), slot)
