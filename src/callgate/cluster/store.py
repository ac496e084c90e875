"""The cluster's Redis: shared records, timers, presence, inboxes and liveness, through coredis.

coredis runs on anyio, so on trio natively: no worker threads. Every decision's read and write
is one script each (`load`, `commit`), so a decision costs two round trips. Deliveries between
nodes (the per-message path) go through line.py instead, and a dead node's inbox through here.

Keys, all under `<cluster name>:` (docs/cluster.md, "Data layout"):

| key | type | what |
|---|---|---|
| `u:<user>` | string | the user's record (records.py), signed |
| `c:<call key>` | string | a live call's record, signed |
| `timers` | sorted set | armed core timers: member `<timer id>|<user>`, score the unix deadline |
| `timer-due` | hash | each armed timer's deadline, signed (the scores are not) |
| `n:<node>` | set | users with an online device there (presence; unsigned: records checked) |
| `in:<node>` | stream | the node's inbox: signed batches of orders (trimmed at each beat) |
| `hb:<node>` | string | the node's signed heartbeat (expires after `node_timeout`) |
| `last:<node>` | string | the same, kept a week (an hour once buried): evidence that it ran |
| `dead:<node>` | string | the signed verdict that the node is dead (kept as long as `last:`) |
| `nodes` | set | nodes that joined and were not declared dead (unsigned: see `last:<node>`) |
| `leader` | string | the signed leader lease |
| `epoch` | string | signed random, set once per Redis dataset: a change prompts a check |
| `revocations` | string | the signed revocation list |
| `limits:*` | | the shared call-rate counters (`limits`) |

Redis never changes a key's type, but any client can replace a key by one of another type. Such a
key holds nothing a node wrote: wherever a node reads or writes it, it is read as absent or empty
and removed, as if deleted, never taken for an outage, and the node audits it (node.py; the
heartbeat's own keys, `nodes` and `epoch`, are logged, not audited). A script checks the types
of the keys it writes before its first write (Lua keeps what a script wrote before an error).
The inboxes' own checks are in line.py.

The scripts read keys they compute (a user's calls, their participants), so they need one Redis
primary (or every key of a cluster in one slot); docs/cluster.md says how to size and shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import coredis
from coredis.exceptions import RedisError, WrongTypeError

from callgate.cluster.records import KEEP, Timer, Writes
from callgate.log import get_logger

log = get_logger("callgate.cluster")

__all__ = [
    "STORE_ERRORS",
    "RedisError",
    "Store",
    "WrongType",
    "WrongTypeError",
    "delete_cluster_keys",
]

# What a failed store call raises: coredis's errors (refused connection, dropped connection, an
# error reply), and the builtin TimeoutError it raises when Redis does not answer within the
# stream timeout (a frozen or partitioned Redis), which is not a RedisError. Every caller
# catches both: a silent Redis is an unavailable one, never a crash.
STORE_ERRORS = (RedisError, TimeoutError)


class WrongType(Exception):
    """A key holds another type than the cluster writes there (Redis answered WRONGTYPE).
    Redis never changes a key's type by itself: a client without the cluster key wrote it.
    That is tampering, not an outage, so this is not a RedisError (not in STORE_ERRORS): the
    key is removed (it holds nothing a node wrote) and the caller reads it as absent."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


# How long a node's last heartbeat (`last:<node>`) is kept: a week after the beat that wrote it
# (it is the signed evidence that the node ever ran, without which no node is buried: it must
# outlast any stretch in which no leader judges, such as a cluster stopped overnight), and an
# hour once the node is buried (a second burial, or a sweep, still reads it meanwhile).
LAST_BEAT_MS = 7 * 24 * 3_600_000
BURIED_LAST_BEAT_MS = 3_600_000
PRESENCE_PAGE = 512  # presence members read (SSCAN) and their records fetched (MGET) at once

# Call keys read from one user record (its `calls`) by the load script: a user takes part in at
# most `[calls] max_calls_per_user` (16 at most) calls, so a genuine record never lists more;
# the record is checked only on the node, and a longer list (written without the key) must not
# cost Redis a read per entry.
MAX_CALLS_READ = 64

# Members of `nodes` read at once (SRANDMEMBER: all of them while there are no more than this,
# else a random sample). The set is unsigned: any Redis client can add members, and the leader
# reads a heartbeat for each member it watches, so what it reads per beat must not grow with
# what such a client adds. Far more than any real cluster has nodes.
MAX_MEMBERS_READ = 1024

# Lua shared by the scripts below (and line.py's): `dropped(key, kind)` removes `key` when it holds
# another type than `kind` (only a client without the cluster key makes one: Redis never changes
# a key's type), as if deleted, and says whether it did. A script checks each key it writes this
# way before its first write: Lua keeps what a script wrote before an error.
DROP_OTHER_TYPE = """
local function dropped(key, kind)
  local found = redis.call('TYPE', key)['ok']
  if found == 'none' or found == kind then return false end
  redis.call('UNLINK', key)
  return true
end
"""

# ARGV: prefix, then the users the event concerns. Returns [name, raw or "", ...]: those users'
# records, the records of their calls, then the records of the other participants of those
# calls. What it reads to find calls and participants is unsigned: it only decides what to load;
# the node verifies every record before anything is decided on it. A record of another type
# than a string (only a client without the key makes one) is read as absent, as if deleted,
# and removed (so the decision writes it again): false in place of its value.
_LOAD = """
local prefix = ARGV[1]
local MAX_CALLS = {max_calls}
local out, seen, keys, peers = {}, {}, {}, {}
local function fields(raw)
  local ok, rec = pcall(cjson.decode, string.sub(raw, 65))
  if ok and type(rec) == 'table' then return rec end
  return {}
end
local function get(name)
  local raw = redis.pcall('GET', prefix .. name)
  out[#out + 1] = name
  if type(raw) == 'table' then  -- WRONGTYPE: no node wrote it; read as absent, and removed
    redis.call('UNLINK', prefix .. name)
    out[#out + 1] = false
    return false
  end
  out[#out + 1] = raw or ''
  return raw
end
for i = 2, #ARGV do seen[ARGV[i]] = true end
for i = 2, #ARGV do
  local raw = get('u:' .. ARGV[i])
  if raw then
    local calls = fields(raw)['calls']
    if type(calls) == 'table' then
      -- The record is not verified yet (the node does that): at most MAX_CALLS of its call
      -- keys are read, however many a Redis client without the key wrote in it.
      for n, key in ipairs(calls) do
        if n > MAX_CALLS then break end
        if type(key) == 'string' and not keys[key] then keys[key] = true; keys[#keys + 1] = key end
      end
    end
  end
end
for _, key in ipairs(keys) do
  local raw = get('c:' .. key)
  if raw then
    local rec = fields(raw)
    for _, field in ipairs({'caller', 'callee'}) do
      local user = rec[field]
      if type(user) == 'string' and not seen[user] then
        seen[user] = true
        peers[#peers + 1] = user
      end
    end
  end
end
for _, user in ipairs(peers) do get('u:' .. user) end
return out
""".replace("{max_calls}", str(MAX_CALLS_READ))

# ARGV: prefix, n, then n x (name, expected raw or "", new raw / "" to delete / "=" to keep),
# then m, then m x (op, key, member, score). Writes only if every record still holds what was
# read: 1 (or {1, keys removed...}), else 0 (the node loads again and decides again).
# Lua keeps what a script wrote before an error, so nothing here may fail halfway: a record of
# another type holds nothing that was read (a conflict: loaded again, it is removed), and
# every other key written (the timers, their deadlines, presence sets) is checked before the
# first write, one TYPE each: one of another type (only a client without the key makes one)
# is removed, as if deleted, and written again by this commit.
_COMMIT = (
    DROP_OTHER_TYPE
    + """
local prefix, n = ARGV[1], tonumber(ARGV[2])
local i = 3
for _ = 1, n do
  local raw = redis.pcall('GET', prefix .. ARGV[i])
  if type(raw) == 'table' or (raw or '') ~= ARGV[i + 1] then return 0 end
  i = i + 3
end
local kinds = {zadd = 'zset', zrem = 'zset', hset = 'hash', hdel = 'hash', sadd = 'set',
  srem = 'set'}
local m, removed, checked = tonumber(ARGV[i]), {1}, {}
local j = i + 1
for _ = 1, m do
  local name = ARGV[j + 1]
  if not checked[name] then
    checked[name] = true
    if dropped(prefix .. name, kinds[ARGV[j]]) then removed[#removed + 1] = name end
  end
  j = j + 4
end
i = 3
for _ = 1, n do
  local new = ARGV[i + 2]
  if new == '' then redis.call('DEL', prefix .. ARGV[i])
  elseif new ~= '=' then redis.call('SET', prefix .. ARGV[i], new) end
  i = i + 3
end
i = i + 1
for _ = 1, m do
  local op, key, member = ARGV[i], prefix .. ARGV[i + 1], ARGV[i + 2]
  if op == 'zadd' then redis.call('ZADD', key, ARGV[i + 3], member)
  elseif op == 'zrem' then redis.call('ZREM', key, member)
  elseif op == 'hset' then redis.call('HSET', key, member, ARGV[i + 3])
  elseif op == 'hdel' then redis.call('HDEL', key, member)
  elseif op == 'sadd' then redis.call('SADD', key, member)
  elseif op == 'srem' then redis.call('SREM', key, member) end
  i = i + 4
end
if #removed > 1 then return removed end
return 1
"""
)

# KEYS: the timers set, their signed deadlines. ARGV: now, hold_until, limit. Claims due timers
# for this node: each is pushed to `hold_until`, so another node fires it only if this one dies
# before its commit removes it. Returns {[member, signed deadline or false, ...], [keys
# removed]}: the scores are unsigned, so the node fires a timer only once its signed deadline
# says it is due. Either key of another type (only a client without the key makes one) failed
# every claim, so no timer fired anywhere: it is removed, as if deleted (1 or 2 in the second
# list), and read as empty.
_CLAIM = (
    DROP_OTHER_TYPE
    + """
local removed = {}
for i, kind in ipairs({'zset', 'hash'}) do
  if dropped(KEYS[i], kind) then removed[#removed + 1] = i end
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], member)
  out[#out + 1] = member
  out[#out + 1] = redis.call('HGET', KEYS[2], member)
end
local missing, drawn = 0, {}
if redis.call('HLEN', KEYS[2]) > redis.call('ZCARD', KEYS[1]) then missing = 1 end
-- The set may also hold members of a client's own (padding it past the deadlines' count):
-- one deadline drawn at random whose member is gone says so too. With every claim of every
-- node drawing one, a set deleted and padded is found within a few claims. A member that is
-- there is returned with its score and signed deadline: a score raised far past that deadline
-- (which would keep it from ever being claimed) is put back by the node. Drawn with every
-- claim, so that deadlines a client keeps adding (more deadlines than members) hide no score.
local probe = redis.call('HRANDFIELD', KEYS[2])
if probe then
  local score = redis.call('ZSCORE', KEYS[1], probe)
  if score then
    drawn = {probe, score, redis.call('HGET', KEYS[2], probe)}
  else
    missing = 1
  end
end
return {out, removed, missing, drawn}
"""
)

# KEYS: the timers set, their signed deadlines. ARGV: how many at most. The deadlines whose
# member is not in the set (it was deleted, or replaced by a key of another type, by a client
# without the key: each is written and removed with its member, in one commit), as [member,
# signed deadline, ...]; none while either key is of another type (the next claim removes it).
_MISSING_TIMERS = """
if redis.call('TYPE', KEYS[2])['ok'] ~= 'hash' then return {} end
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'zset' and kind ~= 'none' then return {} end
local all, out = redis.call('HGETALL', KEYS[2]), {}
for i = 1, #all, 2 do
  if not redis.call('ZSCORE', KEYS[1], all[i]) then
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
    if #out >= 2 * tonumber(ARGV[1]) then break end
  end
end
return out
"""

# KEYS: the timers set, their signed deadlines. ARGV: n, n x (member, score, signed deadline),
# then m x (member, signed deadline). Each of the n put back in the set at its score, each of
# the m deadlines removed, only if its signed deadline is still the one read (one fired or
# armed again meanwhile is left as it is), and only onto keys of their own types.
_REARM_TIMERS = """
if redis.call('TYPE', KEYS[2])['ok'] ~= 'hash' then return 0 end
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'zset' and kind ~= 'none' then return 0 end
local n, i = tonumber(ARGV[1]), 2
for _ = 1, n do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[i + 2] then
    redis.call('ZADD', KEYS[1], 'NX', ARGV[i + 1], ARGV[i])
  end
  i = i + 3
end
while i < #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[2], ARGV[i])
  end
  i = i + 2
end
return 1
"""

# One heartbeat. KEYS: hb:<node>, last:<node>, nodes, epoch, leader, dead:<node>, then the
# watched nodes' hb:<node>. ARGV: the heartbeat, its expiry, last:'s expiry, the node, a new
# epoch. Returns [keys removed (1: nodes, 2: epoch, added), epoch, lease, verdict, beats...].
# Only a client without the key gives a key another type than nodes write: read as absent
# rather than failing every node's beat (a hash for `leader` would stop every beat, so every
# burial), and `nodes` or `epoch` of another type removed (what deleting them does), so that
# they can be written again (said to `removed`: audited).
_KEEP = (
    DROP_OTHER_TYPE
    + """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
local removed = 0
if dropped(KEYS[3], 'set') then removed = removed + 1 end
if dropped(KEYS[4], 'string') then removed = removed + 2 end
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('SET', KEYS[4], ARGV[5], 'NX')
local out = {removed}
for i = 4, #KEYS do
  if redis.call('TYPE', KEYS[i])['ok'] == 'string' then
    out[#out + 1] = redis.call('GET', KEYS[i])
  else
    out[#out + 1] = false
  end
end
return out
"""
)

# KEYS: string keys to read. Returns [value or "", ...], each key's value, except that a key
# of another type (no node made it) reads as false, rather than making the script fail, and is
# removed (as if deleted: a node writes it again where it is written).
_STRINGS = (
    DROP_OTHER_TYPE
    + """
local out = {}
for i, key in ipairs(KEYS) do
  if dropped(key, 'string') then out[i] = false else out[i] = redis.call('GET', key) or '' end
end
return out
"""
)

# Replace the lease only if it still holds the value this node judged (ours, absent, or not
# genuine); 1 when it did, and this node leads. Redis cannot check the signature: Python did.
# A lease of another type (no node wrote it) was read as absent, and is replaced the same.
_LEASE = """
local current = false
if redis.call('TYPE', KEYS[1])['ok'] == 'string' then current = redis.call('GET', KEYS[1]) end
if (current or '') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# A dead node buried. KEYS: dead:<node>, n:<node>, hb:<node>, last:<node>, nodes. ARGV: the
# verdict (the burial done), its expiry, last:'s expiry, the node. Returns 1 if `nodes` was of
# another type (only a client without the key makes one: removed, as if deleted; the nodes add
# themselves again with their next beat), else 0.
_FORGET = (
    DROP_OTHER_TYPE
    + """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('UNLINK', KEYS[2], KEYS[3])
redis.call('PEXPIRE', KEYS[4], ARGV[3])
local removed = dropped(KEYS[5], 'set')
redis.call('SREM', KEYS[5], ARGV[4])
if removed then return 1 end
return 0
"""
)

# A member of `nodes` dropped unread. KEYS: nodes, n:<node>, hb:<node>, last:<node>. ARGV: the
# node. Returns 1 if `nodes` was of another type (removed, as if deleted), else 0.
_DROP_MEMBER = (
    DROP_OTHER_TYPE
    + """
local removed = dropped(KEYS[1], 'set')
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('UNLINK', KEYS[2], KEYS[3], KEYS[4])
if removed then return 1 end
return 0
"""
)

# KEYS: a dead node's inbox, and where to move it. Only the first node to call it gets the
# entries (RENAME moves the stream atomically); they are read, then deleted. An inbox that is
# not a stream (no node made it) is removed unread: -1.
_TAKE_INBOX = (
    DROP_OTHER_TYPE
    + """
if dropped(KEYS[1], 'stream') then return -1 end
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
redis.call('RENAME', KEYS[1], KEYS[2])
local entries = redis.call('XRANGE', KEYS[2], '-', '+')
redis.call('DEL', KEYS[2])
local out = {}
for _, entry in ipairs(entries) do
  out[#out + 1] = entry[1]
  out[#out + 1] = entry[2]
end
return out
"""
)


def _client(url: str) -> coredis.Redis[bytes]:
    return coredis.Redis.from_url(
        url,
        decode_responses=False,
        connect_timeout=2.0,
        stream_timeout=5.0,
        verify_version=False,
    )


def _said(names: Sequence[str]) -> None:
    log.warning("cluster keys of another type were removed", keys=list(names))


class Store:
    """`removed`: told the names (without the prefix) of keys of another type than nodes
    write that a decision's load or commit, or a timer claim, found and removed (on trio's
    thread, before the call returns); their callers' answers stay as if the keys were absent."""

    def __init__(
        self, redis_url: str, prefix: str, removed: Callable[[Sequence[str]], None] = _said
    ) -> None:
        self._url = redis_url
        self.prefix = prefix + ":"
        self._removed = removed
        self._redis = _client(redis_url)
        self._load = self._redis.register_script(_LOAD)
        self._commit = self._redis.register_script(_COMMIT)
        self._claim = self._redis.register_script(_CLAIM)
        self._lease = self._redis.register_script(_LEASE)
        self._take = self._redis.register_script(_TAKE_INBOX)
        self._strings = self._redis.register_script(_STRINGS)
        self._keep = self._redis.register_script(_KEEP)
        self._forget = self._redis.register_script(_FORGET)
        self._missing = self._redis.register_script(_MISSING_TIMERS)
        self._rearm = self._redis.register_script(_REARM_TIMERS)
        # Whether the last timer claim found signed deadlines without their member in the set
        # (more deadlines than members): `missing_timers` says which.
        self.timers_missing = False
        # One timer the last claim drew at random (member, score, signed deadline), for the
        # node to check that its unsigned score was not raised past its deadline.
        self.timer_drawn: tuple[str, float, bytes] | None = None
        self._drop_member = self._redis.register_script(_DROP_MEMBER)

    def key(self, name: str) -> str:
        return self.prefix + name

    async def __aenter__(self) -> Store:
        await self._redis.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._redis.__aexit__(None, None, None)

    # -- decisions ---------------------------------------------------------------------------

    async def load(self, users: Sequence[str]) -> dict[str, bytes | None]:
        """The records an event about `users` needs (records.py, `Slice`); one of another
        type than a string is absent here (removed, and said to `removed`)."""
        reply: Any = await self._load(args=[self.prefix, *users])
        found: dict[str, bytes | None] = {}
        wrong: list[str] = []
        for name, value in zip(reply[0::2], reply[1::2], strict=True):
            name = name.decode() if isinstance(name, bytes) else str(name)
            if value is None:  # (Lua's false)
                wrong.append(name)
            found[name] = None if value is None else (bytes(value) or None)
        if wrong:
            self._removed(wrong)
        return found

    async def commit(self, writes: Writes) -> bool:
        """Write `writes` if nothing it read changed meanwhile; False on a conflict. The
        script writes nothing before it has checked every key's type, so an error it answers
        left nothing half-written."""
        args: list[str | bytes | float] = [self.prefix, len(writes.records)]
        for name, (old, new) in writes.records.items():
            args += [name, old, new]
        ops: list[tuple[str, str, str, float | bytes]] = []
        for timer, deadline in writes.timers_started:
            ops.append(("zadd", "timers", timer.member, deadline))
            ops.append(("hset", "timer-due", timer.member, writes.timer_deadlines[timer.member]))
        for timer in writes.timers_done:
            ops.append(("zrem", "timers", timer.member, 0))
            ops.append(("hdel", "timer-due", timer.member, 0))
        for node, users in writes.present.items():
            ops += [("sadd", f"n:{node}", user, 0) for user in users]
        for node, users in writes.absent.items():
            ops += [("srem", f"n:{node}", user, 0) for user in users]
        args.append(len(ops))
        for op in ops:
            args += list(op)
        result: Any = await self._commit(args=args)
        if isinstance(result, list):  # {1, keys of another type removed before writing...}
            self._removed([bytes(name).decode(errors="replace") for name in result[1:]])
            return True
        return bool(result)

    async def claim_timers(
        self, now: float, hold_until: float, limit: int
    ) -> tuple[list[tuple[Timer, bytes | None]], int]:
        """The due timers, claimed until `hold_until`, each with its signed deadline (None if
        it has none); and how many due members are not even a timer (the set is unsigned),
        which are removed, so that no node claims them again."""
        keys = [self.key("timers"), self.key("timer-due")]
        reply: Any = await self._claim(keys=keys, args=[now, hold_until, limit])
        flat, removed, missing, drawn = reply
        self.timers_missing = bool(missing)
        self.timer_drawn = (
            (bytes(drawn[0]).decode(errors="replace"), float(drawn[1]), bytes(drawn[2]))
            if drawn
            else None
        )
        if removed:  # of another type: removed (as if deleted), read as empty
            self._removed([("timers", "timer-due")[int(index) - 1] for index in removed])
        timers, malformed = [], []
        for member, sealed in zip(flat[0::2], flat[1::2], strict=True):
            raw = bytes(member).decode(errors="replace")
            timer = Timer.parse(raw)
            if timer is None:
                malformed.append(raw)
            else:
                timers.append((timer, bytes(sealed) if sealed else None))
        if malformed:
            await self._redis.zrem(self.key("timers"), malformed)
        return timers, len(malformed)

    async def missing_timers(self, limit: int) -> dict[str, bytes]:
        """Up to `limit` signed deadlines whose member is missing from the timer set (the set
        deleted, or replaced by a key of another type, by a client without the key), by
        member: what the last claim said there are (`timers_missing`). Unverified: the
        caller checks each before anything is put back."""
        keys = [self.key("timers"), self.key("timer-due")]
        flat: Any = await self._missing(keys=keys, args=[limit])
        return {
            bytes(member).decode(errors="replace"): bytes(sealed)
            for member, sealed in zip(flat[0::2], flat[1::2], strict=True)
        }

    async def rearm_timers(
        self, due: Mapping[str, tuple[float, bytes]], spoiled: Mapping[str, bytes]
    ) -> None:
        """Put back in the timer set each member of `due` at its deadline, and remove the
        deadlines of `spoiled` (they do not verify), each only if its signed deadline is still
        the one given (a timer fired or armed again meanwhile is left alone)."""
        args: list[Any] = [len(due)]
        for member, (deadline, sealed) in due.items():
            args += [member, deadline, sealed]
        for member, sealed in spoiled.items():
            args += [member, sealed]
        await self._rearm(keys=[self.key("timers"), self.key("timer-due")], args=args)

    async def adopt_timers(self, due: Mapping[str, float], sealed: Mapping[str, bytes]) -> None:
        """Claimed timers that had no signed deadline: given one (unless one was written
        meanwhile), and due again then."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for member, deadline in due.items():
                pipe.hsetnx(self.key("timer-due"), member, sealed[member])
                pipe.zadd(self.key("timers"), {member: deadline}, condition=coredis.PureToken.XX)

    async def release_timers(self, timers: Iterable[Timer], deadline: float) -> None:
        """Give back claimed timers this node could not fire (Redis refused the commit)."""
        await self.reschedule_timers({timer.member: deadline for timer in timers})

    async def reschedule_timers(self, due: Mapping[str, float]) -> None:
        """Claimed timers due again at these times (those still in the set)."""
        members: dict[str | bytes, float] = {member: score for member, score in due.items()}
        if members:
            await self._redis.zadd(self.key("timers"), members, condition=coredis.PureToken.XX)

    # -- presence and inboxes ----------------------------------------------------------------

    async def presence_page(self, node: str, cursor: int) -> tuple[int, dict[str, bytes | None]]:
        """One page of `node`'s presence set (SSCAN: a set of any size is read a page at a
        time, a member possibly twice), each user with their record as stored (None: absent),
        and the cursor of the next page (0: done). The set is unsigned: the caller verifies
        each record before it spends anything more on that user.
        Raises: WrongType, when it is not a set (it is removed)."""
        key = self.key(f"n:{node}")
        try:
            next_cursor, members = await self._redis.sscan(key, cursor, count=PRESENCE_PAGE)
        except WrongTypeError:
            await self._redis.unlink([key])
            raise WrongType(f"n:{node}") from None
        users = sorted({bytes(member).decode(errors="replace") for member in members})
        found: dict[str, bytes | None] = {}
        if users:
            values: Any = await self._redis.mget([self.key(f"u:{user}") for user in users])
            for user, value in zip(users, values, strict=True):
                found[user] = None if value is None else bytes(value)
        return int(next_cursor), found

    async def forget_node(self, node: str, verdict: bytes, keep_ms: int) -> None:
        """A buried node: its verdict is written again as `verdict` (the burial is done) and
        kept `keep_ms`; its presence set, heartbeat and membership go (its last heartbeat stays
        an hour more: a sweep still needs it)."""
        keys = [self.key(f"{kind}:{node}") for kind in ("dead", "n", "hb", "last")]
        removed: Any = await self._forget(
            keys=[*keys, self.key("nodes")], args=[verdict, keep_ms, BURIED_LAST_BEAT_MS, node]
        )
        if removed:  # of another type: removed (as if deleted), and said
            self._removed(["nodes"])

    async def drop_member(self, node: str) -> None:
        """A member of `nodes` that is not to be buried (no node ran under that name, or it
        was buried already): it goes, with whatever was written under its name but its
        verdict, unread, of any type (UNLINK frees a large set outside Redis's main thread)."""
        keys = [self.key("nodes")] + [self.key(f"{kind}:{node}") for kind in ("n", "hb", "last")]
        removed: Any = await self._drop_member(keys=keys, args=[node])
        if removed:  # of another type: removed (as if deleted), and said
            self._removed(["nodes"])

    async def members(self) -> list[str]:
        """The nodes that joined and were not buried (the leader watches them): all of them
        while there are at most MAX_MEMBERS_READ, else that many chosen at random (the set is
        unsigned: see MAX_MEMBERS_READ); none while `nodes` is of another type (the next
        heartbeat removes it). In no particular order."""
        try:
            members: Any = await self._redis.srandmember(self.key("nodes"), MAX_MEMBERS_READ)
        except WrongTypeError:
            return []
        return [bytes(member).decode(errors="replace") for member in members]

    async def take_inbox(self, node: str) -> list[tuple[bytes, Mapping[bytes, bytes]]]:
        """A dead node's inbox, moved out of its reach (only one caller gets it): entry ids
        and fields, oldest first. Raises: WrongType, when it is not a stream (it is removed)."""
        reply: Any = await self._take(
            keys=[self.key(f"in:{node}"), self.key(f"in:{node}:taken")], args=[]
        )
        if not isinstance(reply, list):
            raise WrongType(f"in:{node}")
        out: list[tuple[bytes, Mapping[bytes, bytes]]] = []
        for entry_id, flat in zip(reply[0::2], reply[1::2], strict=True):
            fields = {bytes(flat[i]): bytes(flat[i + 1]) for i in range(0, len(flat), 2)}
            out.append((bytes(entry_id), fields))
        return out

    # -- liveness ----------------------------------------------------------------------------

    async def keep(
        self,
        node: str,
        heartbeat: bytes,
        timeout_ms: int,
        watched: Sequence[str],
        epoch: bytes,
    ) -> tuple[bytes | None, bytes | None, list[bytes | None], bytes | None]:
        """Beat; read the epoch, the lease, the watched nodes' beats and this node's verdict.
        One round trip (one script: _KEEP). The heartbeat is also written as `last:<node>`,
        kept a week: whichever node buries this one (a leader that never read its beats, when
        it led itself) learns how far it got; and that it ran at all: a member of `nodes`
        without it is never buried. Written before this node is a member, and this node takes
        no client before its first beat went through."""
        keys = [self.key(name) for name in ("hb:" + node, "last:" + node, "nodes", "epoch")]
        keys += [self.key("leader"), self.key(f"dead:{node}")]
        keys += [self.key(f"hb:{other}") for other in watched]
        reply: Any = await self._keep(
            keys=keys, args=[heartbeat, timeout_ms, LAST_BEAT_MS, node, epoch]
        )
        if reply[0]:  # (said: audited, summed)
            self._removed([name for bit, name in ((1, "nodes"), (2, "epoch")) if reply[0] & bit])
        got_epoch, got_lease, got_dead, *beats = (
            None if value is None else bytes(value) for value in reply[1:]
        )
        return got_epoch, got_lease, beats, got_dead

    async def take_lease(self, judged: bytes | None, renewed: bytes, timeout_ms: int) -> bool:
        took: Any = await self._lease(
            keys=[self.key("leader")], args=[judged or b"", renewed, timeout_ms]
        )
        return bool(took)

    async def declare_dead(self, node: str, verdict: bytes, keep_ms: int) -> None:
        await self._redis.set(self.key(f"dead:{node}"), verdict, px=keep_ms)

    async def nodes(self) -> list[str]:
        """Nodes with a heartbeat key (genuine or not: the caller verifies)."""
        found: list[str] = []
        async for key in self._redis.scan_iter(match=self.key("hb:*")):
            found.append(bytes(key).decode()[len(self.key("hb:")) :])
        return found

    async def all_records(self) -> dict[str, bytes | None]:
        """Every user and call record (for operators: it scans the keyspace)."""
        names: list[str] = []
        for pattern in ("u:*", "c:*"):
            async for key in self._redis.scan_iter(match=self.key(pattern), count=1000):
                names.append(bytes(key).decode()[len(self.prefix) :])
        found: dict[str, bytes | None] = {}
        for start in range(0, len(names), 500):
            chunk = names[start : start + 500]
            values: Any = await self._redis.mget([self.key(name) for name in chunk])
            for name, value in zip(chunk, values, strict=True):
                if value is not None:
                    found[name] = bytes(value)
        return found

    async def strings(self, names: Sequence[str]) -> tuple[list[bytes | None], list[str]]:
        """The values of string keys `names` (None: absent), in one round trip; and those of
        them that held another type (no node wrote them), which read as None here and are
        removed (as if deleted)."""
        reply: Any = await self._strings(keys=[self.key(name) for name in names], args=[])
        values: list[bytes | None] = []
        wrong: list[str] = []
        for name, value in zip(names, reply, strict=True):
            if value is None:  # (Lua's false)
                wrong.append(name)
                values.append(None)
            else:
                values.append(bytes(value) or None)
        return values, wrong

    async def get(self, name: str) -> bytes | None:
        value: Any = await self._redis.get(self.key(name))
        return None if value is None else bytes(value)

    async def committed(self, writes: Writes) -> bool:
        """Whether `writes` took effect after all (its commit's reply was lost): every record
        it wrote holds what it wrote, and every one it deleted is gone. New values are unique
        (signed, with the slice's random bases), so no other decision wrote the same."""
        written = [(name, new) for name, (_, new) in writes.records.items() if new != KEEP]
        if not written:
            return False
        values: Any = await self._redis.mget([self.key(name) for name, _ in written])
        return all(
            (value is None and new == b"") or (value is not None and bytes(value) == new)
            for (_, new), value in zip(written, values, strict=True)
        )

    async def put(self, name: str, value: bytes) -> None:
        await self._redis.set(self.key(name), value)


async def delete_cluster_keys(redis_url: str, name: str) -> None:
    """Remove every key of cluster `name` (tests and benchmarks with throw-away clusters)."""
    async with _client(redis_url) as client:
        keys = [key async for key in client.scan_iter(match=f"{name}:*")]
        if keys:
            await client.delete(keys)
