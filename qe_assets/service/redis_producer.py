"""Producers RPUSH onto the Redis list `quality_events`; `qe_assets.ingest.queues.redis_queue` adds
the
ingester's claim and ack on top. Imported only when QE_QUEUE_URL is a Redis URL."""

from __future__ import annotations

from collections.abc import Sequence

import redis

from qe_assets.service.config import REDIS_LIST
from qe_assets.service.producers import QueueUnavailable


class RedisProducer:
    name = "redis"

    def __init__(self, url: str, *, key: str = REDIS_LIST, socket_timeout: float = 5.0) -> None:
        self.key = key
        self.client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )

    def warm_up(self) -> None:
        pass  # nothing to connect ahead: a Redis connection opens in a millisecond

    def put(self, payloads: Sequence[str]) -> int:
        if not payloads:
            return 0
        try:
            # One RPUSH per 1000 records keeps each command small and the group in order.
            with self.client.pipeline(transaction=True) as pipe:
                for start in range(0, len(payloads), 1000):
                    pipe.rpush(self.key, *payloads[start : start + 1000])
                pipe.execute()
        except redis.RedisError as exc:
            raise QueueUnavailable(f"redis queue {self.key!r} unavailable: {exc}") from exc
        return len(payloads)
