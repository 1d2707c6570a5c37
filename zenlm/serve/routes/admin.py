"""/admin/*: the operator's plans, keys and billing reports, behind the admin token."""
from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from .. import protocol as P
from ..errors import user_error
from ..server import Server, server_of

router = APIRouter(prefix="/admin")


@router.get("/plans", response_model=P.PlanList, responses=P.ERROR_RESPONSES)
async def admin_plans(request: Request):
    server = _admin(request)
    return P.PlanList(data=[_plan_out(p) for p in await run_in_threadpool(server.billing.list_plans)])


@router.post("/plans", response_model=P.PlanOut, responses=P.ERROR_RESPONSES)
async def admin_create_plan(body: P.PlanIn, request: Request, replace: bool = False):
    server = _admin(request)
    prices = {m: (p.prompt_micros_per_million, p.completion_micros_per_million) for m, p in body.prices.items()}
    plan = await run_in_threadpool(user_error, server.billing.create_plan, body.name, prices, body.included_tokens,
                                   body.monthly_budget_micros, body.requests_per_minute, body.tokens_per_minute,
                                   replace)
    return _plan_out(plan)


@router.get("/keys", response_model=P.KeyList, responses=P.ERROR_RESPONSES)
async def admin_keys(request: Request, customer: Optional[str] = None):
    server = _admin(request)
    return P.KeyList(data=[P.KeyOut(**k) for k in await run_in_threadpool(server.billing.list_keys, customer)])


@router.post("/keys", response_model=P.KeyCreated, responses=P.ERROR_RESPONSES)
async def admin_create_key(body: P.KeyIn, request: Request):
    server = _admin(request)
    key, record = await run_in_threadpool(user_error, server.billing.create_key, body.customer, body.plan,
                                          body.expires_in_days)
    return P.KeyCreated(key=key, **record)


@router.delete("/keys/{prefix}", response_model=P.KeyOut, responses=P.ERROR_RESPONSES)
async def admin_revoke_key(prefix: str, request: Request):
    server = _admin(request)
    return P.KeyOut(**await run_in_threadpool(user_error, server.billing.revoke_key, prefix))


@router.get("/billing/report", response_model=P.BillingReport, responses=P.ERROR_RESPONSES)
async def admin_report(request: Request, month: str = Query(pattern=r"^\d{4}-\d{2}$"), by: str = "customer"):
    server = _admin(request)
    return P.BillingReport(**await run_in_threadpool(user_error, server.billing.report, month, by))


def _admin(request: Request) -> Server:
    """The app's state, once the request has shown the admin token."""
    server = server_of(request)
    server.check_admin(request)
    return server


def _plan_out(plan) -> P.PlanOut:
    return P.PlanOut(name=plan.name, included_tokens=plan.included_tokens,
                     monthly_budget_micros=plan.monthly_budget_micros, requests_per_minute=plan.requests_per_minute,
                     tokens_per_minute=plan.tokens_per_minute,
                     prices={m: P.ModelPrice(prompt_micros_per_million=p, completion_micros_per_million=c)
                             for m, (p, c) in plan.prices.items()})
