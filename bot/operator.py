"""Operator commands behind the CLI: they read and act through storage, and print for people."""

from __future__ import annotations

import getpass
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from connectors.events import Event
from policies.backtest import backtest
from policies.loader import load_policy
from storage import audit, outbox
from storage.errors import NotFound
from storage.models import EventRecord, JobStatus
from storage.requests import get_request, list_requests

Sessions = async_sessionmaker[AsyncSession]


def operator_name() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def _when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if moment else "-"


async def list_requests_command(
    sessions: Sessions, *, status: str | None, limit: int, as_json: bool, out: TextIO
) -> int:
    async with sessions() as session:
        rows = await list_requests(session, status=status, limit=limit)
    if as_json:
        json.dump(
            [
                {
                    "id": r.id,
                    "status": r.status,
                    "decision": r.decision_kind,
                    "rule": r.rule,
                    "source": r.source,
                    "subject": r.subject,
                    "title": r.title,
                    "created_at": r.created_at.isoformat(),
                }
                for r in rows
            ],
            out,
            indent=2,
        )
        out.write("\n")
        return 0
    if not rows:
        out.write("no requests\n")
        return 0
    for r in rows:
        title = r.title if len(r.title) <= 60 else r.title[:59] + "…"
        out.write(
            f"{r.id}  {r.status:<9}  {r.decision_kind:<12}  {_when(r.created_at)}  "
            f"{r.source}/{r.kind}  {title}\n"
        )
    return 0


async def show_request_command(
    sessions: Sessions, request_id: str, *, as_json: bool, out: TextIO
) -> int:
    async with sessions() as session:
        view = await get_request(session, request_id)
    data = view.as_json()
    if as_json:
        json.dump(data, out, indent=2)
        out.write("\n")
        return 0
    r = view.request
    out.write(f"{r.id}  {r.title}\n")
    out.write(f"  status:     {r.status}\n")
    out.write(f"  decision:   {r.decision_kind} (rule {r.rule})\n")
    out.write(f"  subject:    {r.source}/{r.kind} {r.subject} version {r.version}\n")
    out.write(f"  created:    {_when(r.created_at)}\n")
    if r.expires_at:
        out.write(f"  expires:    {_when(r.expires_at)}\n")
    if r.decided_at:
        who = ", ".join(d.get("name") or d.get("id", "?") for d in r.decided_by) or "-"
        out.write(f"  decided:    {_when(r.decided_at)} by {who}\n")
    if r.reason:
        out.write(f"  reason:     {r.reason}\n")
    if r.superseded_by:
        out.write(f"  superseded by {r.superseded_by}\n")
    out.write("  trace:\n")
    for step in data["trace"]:
        detail = f": {step['detail']}" if step.get("detail") else ""
        out.write(f"    {step['rule']} {step['outcome']}{detail}\n")
    for shadow in data["shadow"]:
        out.write(f"    (shadow) {shadow['rule']} would {shadow['decide']}\n")
    if data["votes"]:
        out.write("  votes:\n")
        for vote in data["votes"]:
            reason = f" ({vote['reason']})" if vote["reason"] else ""
            picked = "".join(f", {k}={v}" for k, v in sorted((vote["params"] or {}).items()))
            who = vote["user_name"] or vote["user_id"]
            out.write(f"    {who}: {vote['choice']}{picked}{reason}\n")
    out.write("  sync-back:\n" if data["sync"] else "  sync-back: none\n")
    for job in data["sync"]:
        line = (
            f"    {job['job_id']} {job['kind']} {job['status']} after {job['attempts']} attempt(s)"
        )
        if job["result"]:
            line += ", got " + ", ".join(f"{k}={v}" for k, v in sorted(job["result"].items()))
        if job["last_error"]:
            line += f", last error: {job['last_error']}"
        if job["status"] == JobStatus.dead.value:
            line += f"  (replay with `signoff replay {job['job_id']}`)"
        out.write(line + "\n")
    return 0


async def replay_command(sessions: Sessions, ident: str, *, out: TextIO) -> int:
    """Replay a dead job by id, or every dead job of a request by the request's id."""
    job_ids = [ident]
    if not ident.startswith("j_"):
        async with sessions() as session:
            job_ids = await outbox.dead_jobs_of(session, ident)
        if not job_ids:
            raise NotFound(f"no dead-lettered job with id or request id {ident!r}")
    for job_id in job_ids:
        await outbox.replay(sessions, job_id, operator=operator_name(), now=datetime.now(UTC))
        out.write(f"re-queued {job_id}\n")
    return 0


async def audit_verify_command(sessions: Sessions, *, out: TextIO) -> int:
    async with sessions() as session:
        result = await audit.verify(session)
    if result.ok:
        out.write(f"ok: {result.checked} records, chain intact\n")
        return 0
    out.write(f"BROKEN at record {result.first_bad_seq}: {result.problem}\n")
    return 1


async def audit_export_command(
    sessions: Sessions, *, fmt: str, since: datetime | None, out: TextIO
) -> int:
    async with sessions() as session:
        await audit.export(session, out, fmt=fmt, since=since)
    return 0


async def backtest_stored(sessions: Sessions, path: str, out: TextIO) -> int:
    policy = load_policy(Path(path))
    async with sessions() as session:
        rows = await session.execute(
            select(EventRecord.body, EventRecord.decision_kind, EventRecord.rule).order_by(
                EventRecord.received_at
            )
        )
        stored = [(Event.model_validate(body), kind, rule) for body, kind, rule in rows]
    report = backtest(policy, stored)
    out.write(report.render() + "\n")
    return 0
