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

from redis.exceptions import ResponseError


class EventType(StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    RESUMED = "resumed"
    TOKEN = "token"
    #: Stored only: several consecutive tokens of one job in one stream entry
    #: (NewEvent.count); readers get them back as `token` events, one each.
    TOKENS = "tokens"
    DONE = "done"
    ERROR = "error"


TERMINAL_EVENTS = frozenset({EventType.DONE, EventType.ERROR})


# Batches of events for one or more jobs, in one call: a worker process sends every
# job's gathered tokens together (writer.StreamFlusher), so the call's own cost
# (about as much as four XADDs) is paid once per flush, not once per token. On a
# Redis Cluster the jobs of one call share a slot (placement.py gives one master's
# new jobs one tag); on one Redis any jobs may share a call.
#
# KEYS: stream, state of each job, in order. ARGV: per job a header of 5 (owner:
# '' for the API, which writes as no worker; claim: '1' if this writer takes the
# job over; maxlen; ttl: '' leaves both TTLs as they are; n: its event count), then
# 5 per event: id ('*', or the id the writer chose), event, data, ids, and last:
# '1' for a terminal event, '0' for any other, but for a run of tokens the id of
# its last token (NewEvent.last_id).
#
# Per job it reads the state once (HMGET) and adds each event (XADD), but no token or
# `done` once a cancel is asked for (the worker ends the job at this reply); the TTLs are
# refreshed only when asked (a worker asks every few seconds and on its last
# event, writer.py). A worker chooses its entries' ids itself (ascending), so a
# batch that is sent again after a lost reply, or replayed after a failover lost
# its tail, writes each event once: an id that is already in the stream is
# skipped. An id that is not above the stream's last one and is not in it (only
# if another writer slipped in between) falls back to '*'; a run of tokens is then
# written as single tokens, each with an id from Redis. A run is stored under its
# first token's id (which XADD checks is above every id in the stream), and the
# stream's last id is then moved to its last token's (XSETID): no later entry, by
# any writer, takes an id the run's tokens have.
#
# Returns one reply per job: {outcome, last id written, cache key of a job this
# batch ended in error}, or {'error', message} for a job whose stream refused an
# entry (the other jobs are written all the same).
APPEND_SCRIPT = """
-- No table and unpack per event: this runs once per token.
local function add(stream, maxlen, id, event, data, ids)
  if ids == '' then
    return redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, id, 'event', event, 'data', data)
  end
  return redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, id, 'event', event, 'data', data,
                     'ids', ids)
end

-- A run whose ids cannot be used, as single tokens with ids from Redis.
local function add_singly(stream, maxlen, data, ids)
  local texts, lists, written = {}, {}, nil
  for text in string.gmatch(data, '[^\\n]+') do texts[#texts + 1] = text end
  for list in string.gmatch(ids .. ';', '([^;]*);') do lists[#lists + 1] = list end
  for j = 1, #texts do
    written = add(stream, maxlen, '*', 'token', texts[j], lists[j] or '')
    if type(written) == 'table' and written.err then return written end
  end
  return written
end

local function append(stream, state_key, a)
  local owner, claim, maxlen, ttl, n = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
                                       tonumber(ARGV[a + 4])
  local state = redis.call('HMGET', state_key, 'terminal', 'owner', 'cancel')
  if state[1] then return {'closed'} end
  if claim == '1' then
    redis.call('HSET', state_key, 'owner', owner)
  elseif owner ~= '' and state[2] ~= owner then
    return {'stolen', state[2] or ''}
  end
  local last, failed, ended = '', false, false
  for i = a + 5, a + 4 + 5 * n, 5 do
    local id, event, data, ids = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    -- Once a cancel is asked for, neither the tokens generated since nor a `done` are
    -- wanted (the worker ends the job with `cancelled` at this reply); nothing goes
    -- after the job's last event.
    local token = event == 'token' or event == 'tokens'
    if not ended and not (state[3] and (token or event == 'done')) then
      local written = add(stream, maxlen, id, event, data, ids)
      if event == 'tokens' and type(written) ~= 'table' then
        redis.call('XSETID', stream, ARGV[i + 4])  -- the run's last token's id
      end
      if type(written) == 'table' and written.err then
        if id == '*' then return {'error', written.err} end
        if #redis.call('XRANGE', stream, id, id) == 0 then
          if event == 'tokens' then
            written = add_singly(stream, maxlen, data, ids)
          else
            written = add(stream, maxlen, '*', event, data, ids)
          end
          if type(written) == 'table' and written.err then return {'error', written.err} end
        else
          written = id
        end
      end
      last = written
      if ARGV[i + 4] == '1' then
        redis.call('HSET', state_key, 'terminal', event)
        if event == 'error' then failed = true end
        ended = true
      end
    end
  end
  if ttl ~= '' then
    redis.call('EXPIRE', stream, ttl)
    redis.call('EXPIRE', state_key, ttl)
  end
  local cache_key = ''
  if failed then cache_key = redis.call('HGET', state_key, 'cache_key') or '' end
  if state[3] then return {'cancel', last, cache_key} end
  return {'ok', last, cache_key}
end

local replies, a = {}, 1
for k = 1, #KEYS, 2 do
  replies[#replies + 1] = append(KEYS[k], KEYS[k + 1], a)
  a = a + 5 + 5 * tonumber(ARGV[a + 4])
end
return replies
"""

# KEYS: stream, state. ARGV: data of the `cancelled` error event, maxlen, ttl,
# release, how many. With release = an API process's id, the caller is a reader
# leaving (a client disconnecting from /completion): the job is cancelled only when
# no other such reader is left (identical requests share one job through the
# response cache), and never when it is `pinned` (created by POST /jobs, which only
# DELETE cancels). Each process's claims are counted apart (`r:<process>`), so
# that a dead process's can all be dropped at once (how many = 'all': api/leases.py).
# Returns {outcome, cache key of a job it ended}: the response cache lives on the
# queue's Redis (REDIS_URL), so the caller drops the entry there.
CANCEL_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown', ''} end
if redis.call('HGET', KEYS[2], 'terminal') then return {'finished', ''} end
if ARGV[4] ~= '' then
  local field = 'r:' .. ARGV[4]
  local held = tonumber(redis.call('HGET', KEYS[2], field) or '0')
  -- No claim of this process's left (reaped while it lived, or a job made before
  -- claims were per process): leaving takes no one else's away.
  if held <= 0 then return {'shared', ''} end
  local drop = 1
  if ARGV[5] == 'all' then drop = held end
  if held <= drop then redis.call('HDEL', KEYS[2], field)
  else redis.call('HINCRBY', KEYS[2], field, -drop) end
  if redis.call('HGET', KEYS[2], 'pinned') then return {'shared', ''} end
  if redis.call('HINCRBY', KEYS[2], 'readers', -drop) > 0 then return {'shared', ''} end
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
# reader (the reading API process's id, or ''), pinned, cache key, model. A job's
# first write: its `queued` event and its state (whose job it is, who may cancel
# it) in one step, so no reader ever sees a job without an owner. Returns '' if the
# job already exists (ids are never reused).
CREATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return '' end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*',
                      'event', 'queued', 'data', ARGV[1])
redis.call('HSET', KEYS[2], 'tenant', ARGV[4], 'model', ARGV[9])
if ARGV[5] == '1' then redis.call('HSET', KEYS[2], 'shared', '1') end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[2], 'readers', '1', 'r:' .. ARGV[6], '1') end
if ARGV[7] == '1' then redis.call('HSET', KEYS[2], 'pinned', '1') end
if ARGV[8] ~= '' then redis.call('HSET', KEYS[2], 'cache_key', ARGV[8]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return id
"""

# KEYS: state. ARGV: ttl, reader (an API process's id, or ''), pinned. Another
# request follows an existing job (the response cache): one more reader whose
# leaving may cancel it, or pinned.
# A script rather than MULTI/EXEC, which a cluster client refuses.
TRACK_SCRIPT = """
if ARGV[2] ~= '' then
  redis.call('HINCRBY', KEYS[1], 'readers', 1)
  redis.call('HINCRBY', KEYS[1], 'r:' .. ARGV[2], 1)
end
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'pinned', '1') end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


#: The most tokens one stream entry carries (a run: NewEvent.count).
MAX_TOKENS_PER_ENTRY = 64


@dataclass(frozen=True, slots=True)
class NewEvent:
    """One event as APPEND_SCRIPT takes it: `id` is '*' (Redis's clock) or the id its
    writer chose; `data` is JSON text; `ids` the token ids, comma-separated.

    A run: `count` > 1 consecutive tokens of one job in one entry (event
    `tokens`), written when a worker has several of a job's tokens ready in one flush
    window: a stream entry costs Redis about the same for one token as for many (its
    XADD, the relay's XREAD of it, the script's loop). `data` is their JSON texts
    joined by newlines (compact JSON has none), `ids` their token ids joined by ';'.
    Its tokens keep ids of their own, the `count` ids that start at the entry's
    (`<ms>-<n>` … `<ms>-<n+count-1>`, `last_id`): an SSE client's Last-Event-ID names
    one token (events.parse_entry splits a run). The script moves the stream's last
    id to the run's last, so every later id, whoever writes it, is above them all."""

    event: EventType
    data: str
    ids: str = ""
    id: str = "*"
    count: int = 1

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS

    @property
    def extensible(self) -> bool:
        """A token (or run) that one more token may join."""
        return (
            self.event in (EventType.TOKEN, EventType.TOKENS)
            and self.id != "*"
            and self.count < MAX_TOKENS_PER_ENTRY
        )

    @property
    def last_key(self) -> tuple[int, int]:
        """The id of this event's last token (its own, but for a run) as (ms, seq)."""
        ms, _, seq = self.id.partition("-")
        return int(ms), int(seq) + self.count - 1

    @property
    def last_id(self) -> str:
        return "{}-{}".format(*self.last_key)

    def extended(self, token: NewEvent) -> NewEvent:
        """This run (or token) with `token` after it (under the next id)."""
        return NewEvent(
            EventType.TOKENS,
            f"{self.data}\n{token.data}",
            f"{self.ids};{token.ids}",
            self.id,
            self.count + 1,
        )


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
    """One job's part of APPEND_SCRIPT's ARGV (its KEYS: the job's stream and state);
    `ttl` None leaves the keys' TTLs as they are. Parts of several jobs are
    concatenated, in the order of their KEYS."""
    args: list[str | int] = [owner, "1" if claim else "0", maxlen, "" if ttl is None else ttl]
    args.append(len(events))
    for e in events:
        last = "1" if e.terminal else e.last_id if e.count > 1 else "0"
        args += [e.id, e.event.value, e.data, e.ids, last]
    return args


def job_reply(reply: Sequence[bytes | str]) -> tuple[str, str, str]:
    """One job's part of APPEND_SCRIPT's reply as text: (outcome, last id written,
    cache key). A job whose stream refused an entry raises ResponseError."""
    outcome, last, cache_key = ([as_text(part) for part in reply] + ["", ""])[:3]
    if outcome == "error":
        raise ResponseError(last)
    return outcome, last, cache_key


def as_text(value: bytes | str) -> str:
    """A reply from Redis as text (clients may be set to decode replies, or not)."""
    return value.decode() if isinstance(value, bytes) else value
