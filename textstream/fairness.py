"""Fair shares of a model's queue between callers: the Virtual Token Counter
("Fairness in Serving LLMs", OSDI '24), kept in Redis beside ModelQ's queue.

Both sides use it: the API records each job it queues under its caller
(api/queue.JobQueue.submit, in the same step as ADMIT_SCRIPT) and forgets one it
withdraws; a worker, having taken the head of ModelQ's list (BLMOVE, as ever),
swaps it for the job the fair order says is next (CLAIM_SCRIPT), and settles the
job's charge when it ends (`settle`).

The order: every caller with jobs waiting (the backlog) has a counter of the
service it has received, in weighted tokens divided by its weight; the next job
is the oldest (lowest `priority` first) of the caller whose counter is lowest.
A job is charged when claimed, by an estimate (its prompt and all of its
`max_new_tokens`), so that several workers claiming at once do not all pick the
same caller; the estimate is corrected by what it really cost when it ends. A
caller that joins the backlog is lifted to the lowest counter there (or, with
nobody waiting, to the last claimed job's): time away earns no credit, so a
caller cannot save up service and then starve the others.

Costs: a prompt token counts 1, a generated token 2 (VTC's weights): decode steps
are sequential, one per token, while a prompt is prefilled in one batched pass.

Jobs not in the record (given back to the queue after their worker died, queued
before this existed) are taken as they come: a taken-over job resumes at once.
Positions in `queued` events stay arrival order; the fair order may serve a
caller sooner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

#: Weighted cost of one prompt token and one generated token.
PROMPT_WEIGHT, OUTPUT_WEIGHT = 1.0, 2.0
#: Prompt tokens are estimated from characters until the job has run.
CHARS_PER_TOKEN = 4
#: `priority` bounds: a priority reorders only its own caller's jobs, so the bound
#: keeps the ordering score exact (priority × 1e12 + milliseconds fits a double).
PRIORITY_LIMIT = 1000
#: Counters of callers who have gone quiet are kept this long after their last job.
COUNTERS_TTL = 86400


@dataclass(frozen=True)
class Share:
    """Whose a job is, for the fair order: the caller, its weight and the job's
    priority (lower first, among the caller's own jobs)."""

    caller: str
    weight: float = 1.0
    priority: int = 0


def estimate(prompt_chars: int, max_new_tokens: int) -> float:
    return PROMPT_WEIGHT * (prompt_chars / CHARS_PER_TOKEN) + OUTPUT_WEIGHT * max_new_tokens


def cost(prompt_tokens: int, completion_tokens: int) -> float:
    return PROMPT_WEIGHT * prompt_tokens + OUTPUT_WEIGHT * completion_tokens


def order_score(priority: int, now: float | None = None) -> float:
    """A waiting job's place among its caller's: priority, then arrival."""
    millis = int((time.time() if now is None else now) * 1000) - 1_700_000_000_000
    return priority * 1e12 + millis


#: Run inside ADMIT_SCRIPT once the job is admitted (KEYS and ARGV offsets there):
#: the caller joins the backlog (lifted) if it had nothing waiting, and the job is
#: recorded under it.
ADMIT_FAIR = """
local backlog, counters, owners, floor, queued = KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local caller, job, score, charge = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if redis.call('ZCARD', queued) == 0 then
  local own = tonumber(redis.call('HGET', counters, caller) or '0')
  local low = redis.call('ZRANGE', backlog, 0, 0, 'WITHSCORES')
  local lift = tonumber(low[2] or redis.call('GET', floor) or '0')
  if lift > own then own = lift end
  redis.call('HSET', counters, caller, own)
  redis.call('ZADD', backlog, own, caller)
end
redis.call('ZADD', queued, score, job)
redis.call('HSET', owners, job, charge .. ' ' .. caller)
redis.call('EXPIRE', counters, ARGV[7])
"""

#: Forgets a withdrawn job (inside WITHDRAW_SCRIPT, after it was removed).
#: KEYS[4..5]: owners, backlog; ARGV[1]: job id, ARGV[2]: waiting prefix.
WITHDRAW_FAIR = """
local record = redis.call('HGET', KEYS[4], ARGV[1])
if record then
  redis.call('HDEL', KEYS[4], ARGV[1])
  local caller = string.sub(record, string.find(record, ' ') + 1)
  local waiting = ARGV[2] .. caller
  redis.call('ZREM', waiting, ARGV[1])
  if redis.call('ZCARD', waiting) == 0 then redis.call('ZREM', KEYS[5], caller) end
end
"""

#: A worker's claim, after BLMOVE moved the queue's head into its custody list:
#: swap it for the fair pick, and charge the claimed job's caller.
#: KEYS: queue, custody list, backlog, counters, owners, floor.
#: ARGV: the head's entry, its job id, the waiting prefix, the task key prefix.
#: Returns the entry now in custody.
CLAIM_SCRIPT = """
local queue, custody, backlog, counters, owners, floor =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local head, head_id, prefix, task_prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local function charge(id)
  local record = redis.call('HGET', owners, id)
  if not record then return end
  redis.call('HDEL', owners, id)
  local space = string.find(record, ' ')
  local amount, caller = tonumber(string.sub(record, 1, space - 1)), string.sub(record, space + 1)
  local waiting = prefix .. caller
  redis.call('ZREM', waiting, id)
  local counter = tonumber(redis.call('HGET', counters, caller) or '0') + amount
  redis.call('HSET', counters, caller, counter)
  redis.call('SET', floor, counter)
  if redis.call('ZCARD', waiting) == 0 then
    redis.call('ZREM', backlog, caller)
  else
    redis.call('ZADD', backlog, counter, caller)
  end
end

local function entry_of(id)
  local blob = redis.call('GET', task_prefix .. id)
  if blob and redis.call('LREM', queue, 1, blob) == 1 then return blob end
  local start = '{"task_id": "' .. id .. '", '
  local len = redis.call('LLEN', queue)
  for first = 0, len - 1, 256 do
    for _, entry in ipairs(redis.call('LRANGE', queue, first, first + 255)) do
      if string.sub(entry, 1, #start) == start then
        redis.call('LREM', queue, 1, entry)
        return entry
      end
    end
  end
  return nil
end

if redis.call('HEXISTS', owners, head_id) == 0 then return head end
for _ = 1, 16 do
  local caller = redis.call('ZRANGE', backlog, 0, 0)[1]
  if not caller then break end
  local pick = redis.call('ZRANGE', prefix .. caller, 0, 0)[1]
  if not pick then
    redis.call('ZREM', backlog, caller)
  elseif pick == head_id then
    break
  else
    local entry = entry_of(pick)
    if entry then
      redis.call('LPUSH', queue, head)
      redis.call('LREM', custody, -1, head)
      redis.call('RPUSH', custody, entry)
      charge(pick)
      return entry
    end
    redis.call('HDEL', owners, pick)  -- no longer queued (expired): forget it
    redis.call('ZREM', prefix .. caller, pick)
  end
end
charge(head_id)
return head
"""

#: A job's token reservation (TOKEN_RATE_LIMIT) replaced by what it used, in the
#: minute it was reserved in if that window is still there. KEYS: the window.
#: ARGV: the correction (may be negative).
SETTLE_TOKENS_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local left = redis.call('INCRBY', KEYS[1], ARGV[1])
if left < 0 then redis.call('INCRBY', KEYS[1], -left) end  -- never below 0; TTL kept
return 1
"""

#: A claimed job's estimate replaced by what it cost: KEYS: counters, backlog.
#: ARGV: caller, the correction (may be negative).
SETTLE_SCRIPT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBYFLOAT', KEYS[1], ARGV[1], ARGV[2])
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZINCRBY', KEYS[2], ARGV[2], ARGV[1])
end
return 1
"""
