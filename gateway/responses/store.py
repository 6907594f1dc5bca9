"""Stored responses: ``store: true`` (the API's default), ``previous_response_id``, ``GET``/``DELETE
/v1/responses/{id}`` and ``/input_items``.

One entry per response in the configured key-value state (memory, or Redis shared by replicas),
under ``responses:<tenant>:<id>`` for the tenant's ``responses.store_ttl_s``: the response object
as the client received it, this request's own input items, the ids of the earlier responses of
its conversation (oldest first) and, for turns whose reasoning the client did not see whole
(strip/redact tenants), the original reasoning by reasoning item id, so a continued conversation
hands K2 its own text. Continuing a conversation reads the previous entry and, in one
``get_many``, every earlier one; entries older than half their TTL are written again then, so a
conversation in use does not expire from under itself. The key holds the tenant, so another
tenant's id is simply not found (404). Output item ids are indexed
(``responses-item:<tenant>:<item id>`` → the response id, and for a reasoning item its kept
original) for ``item_reference`` and for clients that re-send reasoning items by id (openai-agents
sends the whole history every turn, reasoning items with their ``id`` and no text for strip tenants).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import GatewayError, invalid_request
from gateway.state.base import KeyValueState

log = logging.getLogger("gateway.responses")

ID_PREFIX = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "reasoning": "rs_"}


# 12 random hex digits per process + a counter: unique across replicas and restarts without a
# getrandom() call per id (that call was 1.5 % of a Responses stream's gateway time). Ids need not
# be secret: every stored response and item is read under its tenant, another tenant's id is 404.
_PROCESS = os.urandom(6).hex()
_COUNTER = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}{_PROCESS}{next(_COUNTER):020x}"


def not_found(response_id: str) -> GatewayError:
    return GatewayError(
        404,
        f"Response with id '{response_id}' not found.",
        type="invalid_request_error",
        param="response_id",
        code="response_not_found",
    )


@dataclass(slots=True)
class Stored:
    response: dict[str, Any]
    input: list[dict[str, Any]]
    ancestors: list[str] = field(default_factory=list)
    originals: dict[str, str] = field(default_factory=dict)
    created: float = 0.0

    def dumps(self) -> bytes:
        return orjson.dumps(
            {
                "response": self.response,
                "input": self.input,
                "ancestors": self.ancestors,
                "originals": self.originals,
                "created": self.created,
            }
        )

    @classmethod
    def loads(cls, raw: bytes) -> Stored | None:
        try:
            data = orjson.loads(raw)
            return cls(data["response"], data["input"], data["ancestors"], data["originals"], data["created"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None

    def items(self) -> list[Any]:
        """The conversation items this response adds: its input, then its output."""
        return [*self.input, *(self.response.get("output") or ())]


@dataclass(slots=True)
class Conversation:
    """What ``previous_response_id`` continues."""

    items: list[Any]
    originals: dict[str, str]
    ancestors: list[str]  # for the new response: every earlier response id, oldest first


def with_ids(items: list[Any]) -> list[dict[str, Any]]:
    """The input items as listed by ``input_items``: each with an id (minted when absent)."""
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        if not isinstance(item.get("id"), str):
            itype = item.get("type") or ("message" if "role" in item else "item")
            item = {"id": new_id(ID_PREFIX.get(itype, "item_")), **item}
            if "type" not in item:
                item["type"] = "message"
        out.append(item)
    return out


def _history_item(item: Any) -> Any:
    """A stored item as history: reasoning comes from the kept originals or its visible text, never
    from a blob sealed for the client."""
    if isinstance(item, dict) and item.get("type") == "reasoning" and "encrypted_content" in item:
        return {k: v for k, v in item.items() if k != "encrypted_content"}
    return item


def _entry(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return entry if isinstance(entry, dict) else None


class ResponseStore:
    def __init__(self, kv: KeyValueState) -> None:
        self.kv = kv

    @staticmethod
    def _key(tenant: str, response_id: str) -> str:
        return f"responses:{tenant}:{response_id}"

    @staticmethod
    def _item_key(tenant: str, item_id: str) -> str:
        return f"responses-item:{tenant}:{item_id}"

    async def save(self, tenant: str, record: Stored, ttl_s: float) -> None:
        response_id = record.response["id"]
        try:
            await self.kv.put(self._key(tenant, response_id), record.dumps(), ttl_s)
            for item in record.response.get("output") or ():
                if isinstance(item, dict) and isinstance(item.get("id"), str):
                    entry = {"response": response_id}
                    if item["id"] in record.originals:  # what a client re-sending the item by id needs
                        entry["original"] = record.originals[item["id"]]
                    await self.kv.put(self._item_key(tenant, item["id"]), orjson.dumps(entry), ttl_s)
        except Exception:  # the answer still goes out; a later previous_response_id gets a clear 400
            log.exception("could not store response %s", response_id)

    async def load(self, tenant: str, response_id: str) -> Stored | None:
        raw = await self.kv.get(self._key(tenant, response_id))
        return Stored.loads(raw) if raw is not None else None

    async def delete(self, tenant: str, response_id: str) -> bool:
        record = await self.load(tenant, response_id)
        if record is None:
            return False
        await self.kv.delete(self._key(tenant, response_id))
        for item in record.response.get("output") or ():
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                await self.kv.delete(self._item_key(tenant, item["id"]))
        return True

    async def conversation(self, tenant: str, previous_id: str, ttl_s: float) -> Conversation:
        """The stored conversation up to and including ``previous_id``; 400 when it is gone."""
        previous = await self.load(tenant, previous_id)
        if previous is None:
            raise invalid_request(
                f"Previous response with id '{previous_id}' not found (responses are kept for the tenant's "
                "responses.store_ttl_s, and never when sent with store: false).",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        ids = previous.ancestors
        raws = await self.kv.get_many([self._key(tenant, i) for i in ids]) if ids else []
        records: list[Stored] = []
        for rid, raw in zip(ids, raws, strict=True):
            record = Stored.loads(raw) if raw is not None else None
            if record is None:
                raise invalid_request(
                    f"An earlier response of this conversation ('{rid}') has expired or was deleted, so "
                    f"'{previous_id}' cannot be continued; send the conversation as input instead.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            records.append(record)
        records.append(previous)
        now = time.time()
        items: list[Any] = []
        originals: dict[str, str] = {}
        for rid, record in zip([*ids, previous_id], records, strict=True):
            items += [_history_item(i) for i in record.items()]
            originals.update(record.originals)
            if now - record.created > ttl_s / 2:  # in use: renew it
                record.created = now
                await self.kv.put(self._key(tenant, rid), record.dumps(), ttl_s)
        return Conversation(items, originals, [*ids, previous_id])

    async def referenced(
        self, tenant: str, references: list[str], reasoning: list[str], known: list[Any]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Items for ``item_reference`` (from ``known``, the continued conversation, first, then from
        any stored response's output), and the kept original reasoning of reasoning items re-sent by
        id (``reasoning``), in one ``get_many`` over the item index."""
        found: dict[str, dict[str, Any]] = {}
        originals: dict[str, str] = {}
        for item in known:
            if isinstance(item, dict) and item.get("id") in references:
                found[item["id"]] = _history_item(item)
        missing = [i for i in dict.fromkeys([*references, *reasoning]) if i not in found]
        entries = await self.kv.get_many([self._item_key(tenant, i) for i in missing]) if missing else []
        for item_id, raw in zip(missing, entries, strict=True):
            entry = _entry(raw)
            if entry is None:
                continue
            if isinstance(entry.get("original"), str):
                originals[item_id] = entry["original"]
            if item_id not in references:
                continue
            record = await self.load(tenant, str(entry.get("response")))
            for item in record.response.get("output") or () if record is not None else ():
                if isinstance(item, dict) and item.get("id") == item_id:
                    found[item_id] = _history_item(item)
        return found, originals
