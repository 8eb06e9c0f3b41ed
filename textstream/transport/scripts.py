"""The Lua scripts that write job streams, and the arguments they take.

Every script touches only the keys it is given (KEYS), all of one job, which share
a hash tag (keys.job_tag): each runs on a Redis Cluster as on one Redis. None of
them reads a key name out of a value (the response cache, on the queue's Redis,
is the caller's business: the scripts return its key).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class EventType(StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    RESUMED = "resumed"
    TOKEN = "token"
    DONE = "done"
    ERROR = "error"


TERMINAL_EVENTS = frozenset({EventType.DONE, EventType.ERROR})


# A batch of one writer's events. KEYS: stream, state. ARGV: owner ('' for the API,
# which writes as no worker), claim ('1': this writer takes the job over), maxlen,
# ttl ('': leave both TTLs as they are), then 5 per event: id ('*', or the id the
# writer chose), event, data, ids, terminal ('1'/'0').
#
# Per batch it reads the state once (HMGET) and adds each event (XADD); the TTLs
# are refreshed only when asked (a worker asks every few seconds and on its last
# event, writer.py). A worker chooses its entries' ids itself (ascending), so a
# batch that is sent again after a lost reply, or replayed after a failover lost
# its tail, writes each event once: an id that is already in the stream is
# skipped. An id that is not above the stream's last one and is not in it (only
# if another writer slipped in between) falls back to '*'.
#
# Returns {outcome, last id written, cache key of a job this batch ended in error}.
APPEND_SCRIPT = """
local state = redis.call('HMGET', KEYS[2], 'terminal', 'owner', 'cancel')
if state[1] then return {'closed'} end
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[2], 'owner', ARGV[1])
elseif ARGV[1] ~= '' and state[2] ~= ARGV[1] then
  return {'stolen', state[2] or ''}
end
local last, failed = '', false
for i = 5, #ARGV, 5 do
  local id = ARGV[i]
  local entry = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], id,
                 'event', ARGV[i + 1], 'data', ARGV[i + 2]}
  if ARGV[i + 3] ~= '' then entry[#entry + 1] = 'ids'; entry[#entry + 1] = ARGV[i + 3] end
  local written = redis.pcall(unpack(entry))
  if type(written) == 'table' and written.err then
    if id == '*' then return redis.error_reply(written.err) end
    if #redis.call('XRANGE', KEYS[1], id, id) == 0 then
      entry[6] = '*'
      written = redis.call(unpack(entry))
    else
      written = id
    end
  end
  last = written
  if ARGV[i + 4] == '1' then
    redis.call('HSET', KEYS[2], 'terminal', ARGV[i + 1])
    if ARGV[i + 1] == 'error' then failed = true end
  end
end
if ARGV[4] ~= '' then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
local cache_key = ''
if failed then cache_key = redis.call('HGET', KEYS[2], 'cache_key') or '' end
if state[3] then return {'cancel', last, cache_key} end
return {'ok', last, cache_key}
"""

# KEYS: stream, state. ARGV: data of the `cancelled` error event, maxlen, ttl,
# release. With release=1 the caller is a reader leaving (a client disconnecting
# from /completion): the job is cancelled only when no other such reader is left
# (identical requests share one job through the response cache), and never when it
# is `pinned` (created by POST /jobs, which only DELETE cancels).
# Returns {outcome, cache key of a job it ended}: the response cache lives on the
# queue's Redis (REDIS_URL), so the caller drops the entry there.
CANCEL_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown', ''} end
if redis.call('HGET', KEYS[2], 'terminal') then return {'finished', ''} end
if ARGV[4] == '1' then
  if redis.call('HGET', KEYS[2], 'pinned') then return {'shared', ''} end
  if redis.call('HINCRBY', KEYS[2], 'readers', -1) > 0 then return {'shared', ''} end
end
local now = redis.call('TIME')
redis.call('HSET', KEYS[2], 'cancel', now[1] * 1000 + math.floor(now[2] / 1000))
redis.call('EXPIRE', KEYS[2], ARGV[3])
if redis.call('HGET', KEYS[2], 'owner') then return {'cancelling', ''} end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'event', 'error', 'data', ARGV[1])
redis.call('HSET', KEYS[2], 'terminal', 'error')
return {'cancelled', redis.call('HGET', KEYS[2], 'cache_key') or ''}
"""


# KEYS: stream, state. ARGV: data of the `queued` event, maxlen, ttl, tenant, shared,
# reader, pinned, cache key, model. A job's first write: its `queued` event and its state
# (whose job it is, who may cancel it) in one step, so no reader ever sees a job
# without an owner. Returns '' if the job already exists (ids are never reused).
CREATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return '' end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*',
                      'event', 'queued', 'data', ARGV[1])
redis.call('HSET', KEYS[2], 'tenant', ARGV[4], 'model', ARGV[9])
if ARGV[5] == '1' then redis.call('HSET', KEYS[2], 'shared', '1') end
if ARGV[6] == '1' then redis.call('HSET', KEYS[2], 'readers', '1') end
if ARGV[7] == '1' then redis.call('HSET', KEYS[2], 'pinned', '1') end
if ARGV[8] ~= '' then redis.call('HSET', KEYS[2], 'cache_key', ARGV[8]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return id
"""

# KEYS: state. ARGV: ttl, reader, pinned. Another request follows an existing job
# (the response cache): one more reader whose leaving may cancel it, or pinned.
# A script rather than MULTI/EXEC, which a cluster client refuses.
TRACK_SCRIPT = """
if ARGV[2] == '1' then redis.call('HINCRBY', KEYS[1], 'readers', 1) end
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'pinned', '1') end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class NewEvent:
    """One event as APPEND_SCRIPT takes it: `id` is '*' (Redis's clock) or the id its
    writer chose; `data` is JSON text; `ids` the token ids, comma-separated."""

    event: EventType
    data: str
    ids: str = ""
    id: str = "*"

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS


def new_event(
    event: EventType, data: dict[str, Any], token_ids: Sequence[int] = (), entry_id: str = "*"
) -> NewEvent:
    return NewEvent(
        event, json.dumps(data, ensure_ascii=False), ",".join(map(str, token_ids)), entry_id
    )


def append_args(
    events: Sequence[NewEvent],
    *,
    maxlen: int,
    ttl: int | None,
    owner: str = "",
    claim: bool = False,
) -> list[str | int]:
    """ARGV of APPEND_SCRIPT; `ttl` None leaves the keys' TTLs as they are."""
    args: list[str | int] = [owner, "1" if claim else "0", maxlen, "" if ttl is None else ttl]
    for e in events:
        args += [e.id, e.event.value, e.data, e.ids, "1" if e.terminal else "0"]
    return args
