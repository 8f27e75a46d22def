"""`signoff`: the operator's command line (the contract is in DESIGN.md)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from connectors.errors import SignoffError

Command = Callable[[argparse.Namespace], int]


def _settings() -> Any:
    from bot.settings import load_settings

    return load_settings()


def _run(coro: Awaitable[int]) -> int:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def _with_db(work: Callable[[Any], Awaitable[int]]) -> int:
    from storage.db import create_engine, sessionmaker
    from storage.schema import ensure_schema

    engine = create_engine(_settings().database_url)
    try:
        await ensure_schema(engine)
        return await work(sessionmaker(engine))
    finally:
        await engine.dispose()


def _long_running(args: argparse.Namespace) -> Any:
    """Settings, with logging configured once, before anything logs: every line from here on
    is in the chosen format, with the configured secrets masked (bot.logs)."""
    from bot.logs import configure

    settings = _settings()
    configure(
        level=settings.log_level,
        fmt=settings.log_format,
        secrets=settings.secret_values(),
        stream=sys.stderr,
    )
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    from bot.serve import serve

    settings = _long_running(args)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(settings))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from bot.serve import work

    settings = _long_running(args)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(work(settings, control_fd=args.control_fd, parent_pid=args.parent_pid))
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (every platform but Windows): its C event loop and
    transports take about a tenth off the CPU each request costs `serve`."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def cmd_policy_check(args: argparse.Namespace) -> int:
    from policies.commands import check_command

    return check_command(args.path, sys.stdout)


def cmd_policy_test(args: argparse.Namespace) -> int:
    from policies.commands import test_command

    return test_command(args.path, args.events, sys.stdout)


def cmd_policy_backtest(args: argparse.Namespace) -> int:
    from bot.operator import backtest_stored

    return _run(_with_db(lambda sessions: backtest_stored(sessions, args.path, sys.stdout)))


def cmd_requests_list(args: argparse.Namespace) -> int:
    from bot.operator import list_requests_command

    return _run(
        _with_db(
            lambda sessions: list_requests_command(
                sessions, status=args.status, limit=args.limit, as_json=args.json, out=sys.stdout
            )
        )
    )


def cmd_requests_show(args: argparse.Namespace) -> int:
    from bot.operator import show_request_command

    return _run(
        _with_db(
            lambda sessions: show_request_command(
                sessions, args.id, as_json=args.json, out=sys.stdout
            )
        )
    )


def cmd_replay(args: argparse.Namespace) -> int:
    from bot.operator import replay_command

    return _run(_with_db(lambda sessions: replay_command(sessions, args.id, out=sys.stdout)))


def cmd_audit_verify(_args: argparse.Namespace) -> int:
    from bot.operator import audit_verify_command

    return _run(_with_db(lambda sessions: audit_verify_command(sessions, out=sys.stdout)))


def cmd_audit_export(args: argparse.Namespace) -> int:
    from bot.operator import audit_export_command

    since = _parse_since(args.since) if args.since else None
    return _run(
        _with_db(
            lambda sessions: audit_export_command(
                sessions, fmt=args.format, since=since, out=sys.stdout
            )
        )
    )


def cmd_db_upgrade(_args: argparse.Namespace) -> int:
    from storage.db import create_engine
    from storage.schema import current_revision, upgrade

    async def work() -> int:
        engine = create_engine(_settings().database_url)
        try:
            await upgrade(engine)
            print(f"database at revision {await current_revision(engine)}")
        finally:
            await engine.dispose()
        return 0

    return _run(work())


def cmd_demo(args: argparse.Namespace) -> int:
    from bot.demo import run_demo

    return asyncio.run(run_demo(keep=args.keep, out=sys.stdout))


def _parse_since(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise SignoffError(f"--since {text!r} is not an ISO 8601 date or time") from None
    # A date or time without a zone means UTC: audit records are kept in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signoff", description="Self-hosted chat-ops approvals: policy, Slack, sync-back."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser(
        "serve", help="run the service (HTTP, scheduler, outbox worker processes)"
    ).set_defaults(func=cmd_serve)
    worker = sub.add_parser(
        "worker", help="run an outbox worker alone (PostgreSQL: more delivery capacity)"
    )
    # Given by `serve` to the worker processes it starts (bot.processes), not by people.
    worker.add_argument("--control-fd", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    worker.set_defaults(func=cmd_worker)
    demo = sub.add_parser("demo", help="the whole flow on this machine, no accounts needed")
    demo.add_argument("--keep", action="store_true", help="keep serving after the demo")
    demo.set_defaults(func=cmd_demo)

    policy = sub.add_parser("policy", help="check and try policies").add_subparsers(
        dest="policy_command", required=True, metavar="SUBCOMMAND"
    )
    check = policy.add_parser("check", help="report every problem in a policy file or folder")
    check.add_argument("path")
    check.set_defaults(func=cmd_policy_check)
    test = policy.add_parser("test", help="show which rule decides each event, and why")
    test.add_argument("path")
    test.add_argument("events", nargs="+", metavar="EVENTS")
    test.set_defaults(func=cmd_policy_test)
    backtest = policy.add_parser("backtest", help="replay stored events through a new policy")
    backtest.add_argument("path")
    backtest.set_defaults(func=cmd_policy_backtest)

    requests = sub.add_parser("requests", help="inspect requests").add_subparsers(
        dest="requests_command", required=True, metavar="SUBCOMMAND"
    )
    listing = requests.add_parser("list", help="newest first")
    listing.add_argument("--status", choices=[s.value for s in _statuses()])
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_requests_list)
    show = requests.add_parser("show", help="one request: votes, trace, sync-back state")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_requests_show)

    replay = sub.add_parser("replay", help="re-queue a dead-lettered job (job or request id)")
    replay.add_argument("id")
    replay.set_defaults(func=cmd_replay)

    audit = sub.add_parser("audit", help="the audit chain").add_subparsers(
        dest="audit_command", required=True, metavar="SUBCOMMAND"
    )
    audit.add_parser("verify", help="check every link of the chain").set_defaults(
        func=cmd_audit_verify
    )
    export = audit.add_parser("export", help="write records as JSON lines or CSV")
    export.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    export.add_argument("--since", help="ISO 8601 date or time (UTC if no zone)")
    export.set_defaults(func=cmd_audit_export)

    db = sub.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True, metavar="SUBCOMMAND"
    )
    db.add_parser("upgrade", help="apply Alembic migrations").set_defaults(func=cmd_db_upgrade)
    return parser


def _statuses() -> Sequence[Any]:
    from storage.models import RequestStatus

    return list(RequestStatus)


def main(argv: Sequence[str] | None = None, *, err: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    stderr = err or sys.stderr
    try:
        code: int = args.func(args)
    except SignoffError as exc:
        # One clear line, no traceback: these are the operator's problems to fix, not bugs.
        print(f"signoff: {exc}", file=stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
