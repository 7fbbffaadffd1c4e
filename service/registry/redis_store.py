"""The registry store for many replicas: Redis (already the job queue), with AOF persistence.

    pha:registry:task:<name>   hash: seq, job_id, record, tensors, digest (a removed task keeps only its seq)
    pha:registry:log           sorted set: name -> seq of its latest change
    pha:registry:head          counter: seq of the last change

A change is one Lua script (atomic: the name check, the next seq and both writes happen together or not at all).
A replica reads `ZRANGEBYSCORE log (cursor +inf`, then the rows; its cursor moves to the last score it read,
so a row changed meanwhile is read again on the next round, never skipped. Durability is Redis's: with
`appendfsync always` an acknowledged change survives kill -9 of Redis itself; with `everysec` up to a second of
changes can be lost on a Redis crash (docs/deployment.md).
"""

from __future__ import annotations

import redis

from ..redis_client import connect
from ..redis_names import REGISTRY_HEAD, REGISTRY_LOG, REGISTRY_TASK
from .records import Change, RegisteredTask, RegistryError, check_name, digest, name_taken
from .store import PAGE

# KEYS: task hash, log, head. ARGV: name, job_id, record, tensors, digest, replace ("1"/"0").
# Returns {0, record, seq} (same job: already stored), {-1} (name taken), or {1, record, seq} (stored).
_REGISTER = """
local live = redis.call('HEXISTS', KEYS[1], 'record') == 1
if live then
  if redis.call('HGET', KEYS[1], 'job_id') == ARGV[2] then
    return {0, redis.call('HGET', KEYS[1], 'record'), redis.call('HGET', KEYS[1], 'seq')}
  end
  if ARGV[6] ~= '1' then return {-1} end
end
local seq = redis.call('INCR', KEYS[3])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'seq', seq, 'job_id', ARGV[2], 'record', ARGV[3], 'tensors', ARGV[4], 'digest', ARGV[5])
redis.call('ZADD', KEYS[2], seq, ARGV[1])
return {1, ARGV[3], seq}
"""
# KEYS: task hash, log, head. ARGV: name. Returns {} (nothing to remove) or {record, seq of the removed row}.
_REMOVE = """
local record = redis.call('HGET', KEYS[1], 'record')
if not record then return {} end
local old = redis.call('HGET', KEYS[1], 'seq')
local seq = redis.call('INCR', KEYS[3])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'seq', seq)
redis.call('ZADD', KEYS[2], seq, ARGV[1])
return {record, old}
"""
_FIELDS = ("seq", "record", "tensors", "digest")


class RedisRegistry:
    def __init__(self, url: str, client: redis.Redis | None = None) -> None:
        self.r = client if client is not None else connect(url)
        self._owns_client = client is None
        kw = self.r.connection_pool.connection_kwargs
        self.where = f"registry redis://{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"
        self._register = self.r.register_script(_REGISTER)
        self._remove = self.r.register_script(_REMOVE)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise RegistryError(f"{self.where}: {what} failed: {exc}") from exc

    def register(self, task: RegisteredTask, tensors: bytes, replace: bool = False) -> tuple[RegisteredTask, bool]:
        return self.register_many([(task, tensors)], replace)[0]

    def register_many(
        self, items: list[tuple[RegisteredTask, bytes]], replace: bool = False
    ) -> list[tuple[RegisteredTask, bool]]:
        """`register` for many tasks in one round trip; each one is atomic, the batch is not (a name taken
        midway raises after the ones before it were stored)."""
        for task, _ in items:
            check_name(task.name)
        pipe = self.r.pipeline(transaction=False)
        for task, tensors in items:
            record = task.to_json()
            keys = [REGISTRY_TASK.format(task.name), REGISTRY_LOG, REGISTRY_HEAD]
            args = [task.name, task.job_id, record, tensors, digest(record, tensors), "1" if replace else "0"]
            self._register(keys=keys, args=args, client=pipe)
        replies = self._call("register", pipe.execute)
        out = []
        for (task, _), reply in zip(items, replies, strict=True):
            if reply[0] == -1:
                raise name_taken(task.name)
            out.append((RegisteredTask.from_json(reply[1], int(reply[2])), reply[0] == 1))
        return out

    def remove(self, name: str) -> RegisteredTask | None:
        keys = [REGISTRY_TASK.format(name), REGISTRY_LOG, REGISTRY_HEAD]
        reply = self._call("remove", self._remove, keys=keys, args=[name])
        if not reply:
            return None
        try:
            return RegisteredTask.from_json(reply[0], int(reply[1]))
        except (ValueError, TypeError):  # removing a corrupt record is how it is repaired
            return RegisteredTask(name=name, mode="unknown", job_id="", model_version="")

    def get(self, name: str) -> Change | None:
        values = self._call("read", self.r.hmget, REGISTRY_TASK.format(name), _FIELDS)
        if values[0] is None or values[1] is None:
            return None
        return Change.read(self.where, int(values[0]), name, *values[1:])

    def head(self) -> int:
        return int(self._call("read", self.r.get, REGISTRY_HEAD) or 0)

    def changes(self, after: int, limit: int = PAGE) -> list[Change]:
        listed = self._call(
            "read", self.r.zrangebyscore, REGISTRY_LOG, f"({after}", "+inf", start=0, num=limit, withscores=True
        )
        if not listed:
            return []
        pipe = self.r.pipeline(transaction=False)
        for name, _ in listed:
            pipe.hmget(REGISTRY_TASK.format(name.decode()), _FIELDS)
        rows = self._call("read", pipe.execute)
        out = []
        for (name, score), values in zip(listed, rows, strict=True):
            # The log's score, not the row's seq: a row rewritten since the listing is re-read next round.
            seq = int(score)
            out.append(Change.read(self.where, seq, name.decode(), *values[1:]))
        return out

    def close(self) -> None:
        if self._owns_client:  # a shared client is closed by its owner
            self.r.close()
