"""Redis key families and their hash tags: which keys must share a Redis Cluster slot, and why.

A Lua script on a Redis Cluster runs on one node and may touch only keys of one hash slot. Redis
hashes just the part of a key between the first ``{`` and the next ``}`` (the hash tag) when there is
one, so every key of a family that some script touches together carries the family's tag. The
same keys are used on one server and on Sentinel, so moving a deployment between them changes no
key name.

==================  ========================================  =====================================
family              keys                                      tag (one slot per deployment)
==================  ========================================  =====================================
budgets             ``<ns>:{budgets}:<counter>`` (hash),      ``{budgets}``: a reservation checks
                    ``...:<counter>:open`` (its reservations), and adds every cap of a request at
                    ``...:reservation:<request id>``,         once, and a settlement finds its
                    ``...:reservations`` (the open index),    counters through the record, knowing
                    ``...:applied:<request id>``              only the request id
rate limits         ``<ns>:{rates}:<counter>`` (hash)         ``{rates}``: one hit checks all of a
                                                              request's limits (tenant and key,
                                                              requests and tokens) atomically
route statistics    ``<ns>:{routestats}:labels`` (set),       ``{routestats}``: one exchange merges
                    ``...:up:<label>``, ``...:tenant:<name>``  every candidate and tenant it names
key-pool quotas     ``<ns>:{keypool:<upstream>}:<key id>:h``  ``{keypool:<upstream>}``: one
                    (counts, cool-down, revocation), ``:w``   acquisition checks and counts every
                    (the minute's grants), ``:f`` (in flight) key of an upstream's pool at once
                    (``state/redis_key_quota.py``)            (one slot per pool, not per deployment)
key-value entries   ``<ns>:kv:<key>`` (string)                none: single-key commands only, so
                                                              affinity and reasoning entries (the
                                                              bulk of the memory) spread over every
                                                              master; a cluster link reads several
                                                              with one ``GET`` each, not ``MGET``
==================  ========================================  =====================================

So on a cluster each counter family lives on the master of its slot: counters are small and their
scripts take microseconds, so one master serves a deployment's budget checks comfortably
(bench/RESULTS.md, "Redis link"), while the entries that take memory are spread. Deployments
sharing a cluster (different namespaces) share the slots of the counter families, not the keys.
``tests/unit/test_redis_key_slots.py`` runs every script and checks, with redis-py's ``key_slot``,
that all the keys each call touches hash to one slot.
"""

from __future__ import annotations

BUDGETS = "{budgets}"
RATES = "{rates}"
ROUTESTATS = "{routestats}"


def family(namespace: str, tag: str) -> str:
    """The prefix of a family's keys: ``<namespace>:<tag>:``. The namespace comes first so that ACL
    key patterns (``~kimi-gateway:*``) and ``SCAN MATCH <ns>:*`` keep covering every key."""
    return f"{namespace}:{tag}:"
