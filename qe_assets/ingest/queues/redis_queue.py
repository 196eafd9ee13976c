"""Redis list `quality_events`: producers RPUSH, the ingester moves records into a per-consumer
processing list, commits them, and only then deletes that list.

Records still in the processing list when the ingester starts are the ones a crash interrupted;
they are replayed before anything new is claimed.
"""

from __future__ import annotations

from collections.abc import Iterator

import redis

from qe_assets.ingest.queues.base import Backlog, Batch, QueueUnavailable, event_time
from qe_assets.service.config import REDIS_LIST
from qe_assets.service.redis_producer import RedisProducer

# Moves up to N records from the head of the queue to the tail of the processing list in one
# atomic step: either a record is still queued or it is claimed, never both or neither.
_CLAIM = """
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #items == 0 then return 0 end
redis.call('LTRIM', KEYS[1], #items, -1)
for i = 1, #items, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(items, i, math.min(i + 999, #items)))
end
return #items
"""


# What the queue needs from Redis: every acknowledged RPUSH and every claim survives a restart.
DURABLE_FSYNC = ("everysec", "always")
_ADVICE = "run it with `--appendonly yes --appendfsync everysec` (or `always`), or use Kafka"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisQueue(RedisProducer):
    """The ingester's side of the list; `put` (what producers do) is `RedisProducer`'s."""

    # One processing list per consumer: its ack deletes the whole list, so a batch must be acked
    # before the next is claimed into it.
    reads_ahead = False

    def __init__(
        self,
        url: str,
        *,
        key: str = REDIS_LIST,
        consumer: str = "default",
        socket_timeout: float = 5.0,
    ) -> None:
        super().__init__(url, key=key, socket_timeout=socket_timeout)
        self.processing_key = f"{key}:processing:{consumer}"
        self._claim = self.client.register_script(_CLAIM)

    def _processing_batch(self) -> Batch | None:
        records = self.client.lrange(self.processing_key, 0, -1)
        if not records:
            return None
        sources = [f"redis:{self.key}"] * len(records)
        return Batch(list(records), sources, lambda: self.client.delete(self.processing_key))

    def batches(self, max_records: int) -> Iterator[Batch]:
        try:
            leftover = self._processing_batch()
            if leftover is not None:
                yield leftover
            while self._claim(keys=[self.key, self.processing_key], args=[max_records]):
                batch = self._processing_batch()
                if batch is None:
                    return
                yield batch
        except redis.RedisError as exc:
            raise QueueUnavailable(f"redis queue {self.key!r} unavailable: {exc}") from exc

    def _persistence(self) -> tuple[str, str | None]:
        """(appendonly, appendfsync) as the server reports them; appendfsync is None where CONFIG
        is renamed or disabled (managed services) and only INFO answers."""
        try:
            config = {_text(k): _text(v) for k, v in self.client.config_get("append*").items()}
            return config.get("appendonly", "no"), config.get("appendfsync")
        except redis.ResponseError:
            info = self.client.info("persistence")
            return ("yes" if info.get("aof_enabled") else "no"), None

    def durability_warning(self) -> str | None:
        """Why queued or claimed events would not survive a restart of this server, or None.

        Unreachable servers answer None: `depth` and the ingest already report those."""
        where = f"redis queue {self.key!r}"
        try:
            appendonly, appendfsync = self._persistence()
        except (redis.ConnectionError, redis.TimeoutError):
            return None
        except redis.RedisError as exc:
            return f"{where}: could not read the server's persistence settings ({exc}); {_ADVICE}"
        if appendonly != "yes":
            return (
                f"{where}: the server has no append-only file (appendonly {appendonly}): queued "
                f"and claimed events are lost when it restarts or dies; {_ADVICE}"
            )
        if appendfsync is not None and appendfsync not in DURABLE_FSYNC:
            return (
                f"{where}: appendfsync {appendfsync}: the events of the last ~30 s are lost if "
                f"the host crashes; {_ADVICE}"
            )
        return None

    def backlog(self) -> Backlog:
        """Queued plus claimed records, and the `timestamp` of the oldest one (the head of the
        processing list, else of the queue) when its producer stamped it, as `capture` does."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.llen(self.key)
                pipe.llen(self.processing_key)
                pipe.lindex(self.processing_key, 0)
                pipe.lindex(self.key, 0)
                queued, claimed, claimed_head, queued_head = pipe.execute()
        except redis.RedisError as exc:
            raise QueueUnavailable(f"redis queue {self.key!r} unavailable: {exc}") from exc
        head = claimed_head if claimed_head is not None else queued_head
        return Backlog(int(queued) + int(claimed), "events", event_time(head))

    def depth(self) -> int:
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.llen(self.key)
                pipe.llen(self.processing_key)
                queued, claimed = pipe.execute()
        except redis.RedisError as exc:
            raise QueueUnavailable(f"redis queue {self.key!r} unavailable: {exc}") from exc
        return int(queued) + int(claimed)
