"""Finance API: ``GET /v1/spend`` and ``GET /v1/budget``.

Off the hot path, so FastAPI (query validation, OpenAPI docs at ``/finance/docs``). A tenant key sees
its own tenant only; the admin key (from the environment variable the config names) sees every
tenant. Errors keep OpenAI's shape like every other endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from gateway.auth import authenticate, bearer_token
from gateway.errors import GatewayError, invalid_request
from gateway.exchange import Runtime
from gateway.metering import report

# how long a spend report waits for this process's queued rows to be written before it answers
# without them (and says how many it left out)
FLUSH_WAIT_S = 0.1


def _error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(
        error.payload(), status_code=error.status, headers={k.decode(): v.decode() for k, v in error.headers}
    )


def build_finance_app(rt: Runtime, admin_key: str | None) -> FastAPI:
    app = FastAPI(
        title="kimi-gateway finance API",
        docs_url="/finance/docs",
        openapi_url="/finance/openapi.json",
        redoc_url=None,
    )

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error_response(invalid_request(f"{param or 'request'}: {first.get('msg')}", param=param))

    def caller(authorization: str | None) -> str | None:
        """None for the admin, else the caller's tenant name; 401 otherwise."""
        key = bearer_token(authorization.encode("latin-1") if authorization else None)
        if admin_key is not None and key is not None:
            import hmac

            if hmac.compare_digest(key.encode(), admin_key.encode()):
                return None
        return authenticate(rt.policies, key).tenant.name

    def scope(who: str | None, tenant: str | None) -> str | None:
        if who is None:
            return tenant
        if tenant is not None and tenant != who:
            raise GatewayError(
                403,
                "A tenant key can read only its own tenant's spend.",
                type="permission_error",
                param="tenant",
                code="forbidden",
            )
        return who

    @app.get("/v1/spend")
    async def spend(
        authorization: Annotated[str | None, Header()] = None,
        group_by: Annotated[
            str, Query(description="tenant,app,key,user,model,upstream,endpoint,day,month")
        ] = "tenant,model",
        from_: Annotated[str | None, Query(alias="from", description="date, ISO time or unix seconds")] = None,
        to: Annotated[str | None, Query(description="exclusive end; date, ISO time or unix seconds")] = None,
        tenant: Annotated[str | None, Query()] = None,
        format: Annotated[str, Query(pattern="^(json|csv)$")] = "json",
        *,
        response: Response,
    ) -> Any:
        who = caller(authorization)
        try:
            groups = report.parse_group_by(group_by)
            since = report.parse_time(from_) if from_ else None
            until = report.parse_time(to) if to else None
        except ValueError as exc:
            raise invalid_request(str(exc), param="group_by" if "group" in str(exc) else "from") from None
        ledger = rt.meter.ledger
        assert ledger is not None
        # include what this process has queued, if the writer gets it in at once: a slow or
        # unreachable database must not hold the report up; it then says what it does not include
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ledger.flush(), FLUSH_WAIT_S)
        unwritten = ledger.backlog
        as_of = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        rows = await ledger.spend(group_by=groups, since=since, until=until, tenant=scope(who, tenant))
        headers = {"x-gateway-ledger-as-of": as_of, "x-gateway-ledger-unwritten": str(unwritten)}
        if format == "csv":
            return Response(report.to_csv(rows, groups), media_type="text/csv", headers=headers)
        # the last entry is the totals row ("total": true)
        response.headers.update(headers)
        body = {"object": "list", "group_by": groups, "as_of": as_of, "unwritten": unwritten}
        return {**body, "data": report.to_json(rows, groups)}

    @app.get("/v1/budget")
    async def budget(
        authorization: Annotated[str | None, Header()] = None,
        tenant: Annotated[str | None, Query()] = None,
    ) -> Any:
        who = caller(authorization)
        name = scope(who, tenant)
        names = [name] if name is not None else sorted(rt.policies.tenants)
        data = []
        for n in names:
            t = rt.policies.tenants.get(n)
            if t is None:
                raise GatewayError(404, f"No tenant '{n}'.", param="tenant", code="tenant_not_found")
            windows = await rt.meter.budgets.remaining(t.name, t.budget, time.time())
            data.append({"tenant": t.name, "budgeted": t.budget is not None, "windows": windows})
        return {"object": "list", "data": data}

    return app
