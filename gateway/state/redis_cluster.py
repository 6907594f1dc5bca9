"""The request path's link to a Redis Cluster: the same auto-pipelining as the one-server link, sent
through redis-py's own cluster pipeline.

Each batch of concurrent calls becomes one ``RedisCluster`` pipeline (not a transaction): redis-py
groups its commands by the node that serves their slot, writes to those nodes at once and reads
them back, follows ``MOVED``/``ASK`` redirects and refreshes its slot map after a failover or a
resharding. So a batch costs one round trip per node it touches, whatever the number of calls in
it, and no cluster logic lives here. bench/redis_link.py (bench/RESULTS.md, "Redis link") measures
what the cluster costs against one server.

Scripts route by their first key; every script keeps all its keys in one slot (the hash tags of
:mod:`gateway.state.redis_keys`), and a script a node has not seen is sent once with ``EVAL``. A
multi-key ``MGET`` would span slots, so :class:`~gateway.state.redis.RedisKeyValueState` asks a
cluster link for each key with its own ``GET`` (they travel in the same batch).

Failure handling matches the one-server link: the whole batch is bounded by one deadline, and a
batch that fails, or a node that answers ``CLUSTERDOWN``/``TRYAGAIN``, fails its calls with
:class:`StateUnavailable` so that the configured fail modes apply.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import RedisError, ResponseError

from gateway.state.base import StateUnavailable
from gateway.state.redis_connect import RedisSettings, cluster_client
from gateway.state.redis_link import UNAVAILABLE_REPLIES, Batch, Batcher, as_unavailable, fail, resolve


class ClusterLink(Batcher):
    """One per process: a ``RedisCluster`` client whose pipelines carry the request path's calls."""

    cluster = True

    def __init__(self, settings: RedisSettings) -> None:
        super().__init__(settings)
        self.client: RedisCluster = cluster_client(settings)
        # discovery (CLUSTER SLOTS from a start-up node) may come first, and a redirect or a node
        # failure costs one more round with a refreshed slot map
        self.deadline_s = 2 * self.deadline_s

    async def _send(self, batch: Batch) -> None:
        pipe = self.client.pipeline()
        for args, _ in batch:
            pipe.execute_command(*args)
        try:
            async with asyncio.timeout(self.deadline_s):
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError, TimeoutError) as exc:
            fail(batch, StateUnavailable(f"Redis Cluster did not answer ({type(exc).__name__}: {exc})"))
            return
        except BaseException:
            fail(batch, StateUnavailable("the Redis batch was interrupted"))
            raise
        out: list[Any] = []
        for reply in replies:
            if isinstance(reply, UNAVAILABLE_REPLIES):
                reply = as_unavailable(reply)
            elif isinstance(reply, RedisError) and not isinstance(reply, ResponseError):
                # a node that could not be reached even after the slot map was refreshed
                reply = StateUnavailable(f"Redis Cluster did not answer ({type(reply).__name__}: {reply})")
            out.append(reply)
        resolve(batch, out)
