"""Prometheus metrics: what `GET /metrics` exposes, one registry per running service.

Each `Services` owns its `Metrics` (its own `CollectorRegistry`), so several apps in one process
(the tests, the demo) never share or collide on counters. Lower layers know nothing of this:
the bot layer counts what storage and the connectors return (HTTP handlers, the batcher's
on_commit, the worker's outcomes, the Slack client).

Label values are bounded: sources and job kinds come from the connector registry, rules from
the policy, reasons and outcomes from our own enums; ids and user text never become labels.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from datetime import timedelta

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds from a request's creation to its final status: people decide within minutes to
# hours, expiries after up to days; an auto-decision is 0.
DECISION_BUCKETS = (
    0.0,
    1.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    43200.0,
    86400.0,
    259200.0,
    604800.0,
)

# Slack error codes kept as label values; anything else Slack (or something posing as it)
# answers is counted as `other`, so a stranger's answer cannot mint new series.
SLACK_CODES = frozenset(
    {
        "ratelimited",
        "internal_error",
        "fatal_error",
        "service_unavailable",
        "request_timeout",
        "channel_not_found",
        "not_in_channel",
        "is_archived",
        "invalid_blocks",
        "msg_too_long",
        "invalid_auth",
        "not_authed",
        "token_revoked",
        "account_inactive",
        "missing_scope",
        "message_not_found",
        "cant_update_message",
        "user_not_found",
        "users_not_found",
        "no_text",
        "invalid_arguments",
        "invalid_trigger_id",
        "expired_trigger_id",
        "no_such_subteam",
        "cannot_dm_bot",
    }
)
_HTTP_CODE = re.compile(r"http_[1-5][0-9]{2}")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter(
            "signoff_events_received",
            "Deliveries received at intake, by source and outcome "
            "(accepted, duplicate, ignored, refused).",
            ["source", "outcome"],
            registry=r,
        )
        self.refusals = Counter(
            "signoff_refusals",
            "Refused deliveries and refused clicks, by source (a connector, or slack for clicks) "
            "and reason.",
            ["source", "reason"],
            registry=r,
        )
        self.decisions = Counter(
            "signoff_decisions",
            "Policy decisions on accepted events, by deciding rule and decision kind.",
            ["rule", "decision"],
            registry=r,
        )
        self.pending = Gauge(
            "signoff_requests_pending",
            "Requests waiting for a decision, counted in the database at scrape time "
            "(the same figure from every replica).",
            registry=r,
        )
        self.time_to_decision = Histogram(
            "signoff_time_to_decision_seconds",
            "From a request's creation to its final status, by what decided it "
            "(policy, vote, expiry).",
            ["by"],
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.outbox = Counter(
            "signoff_outbox_attempts",
            "Outbox job attempts by job kind and outcome (done, retry, dead: dead-lettered).",
            ["kind", "outcome"],
            registry=r,
        )
        self.worker_processes = Gauge(
            "signoff_worker_processes",
            "Outbox worker processes running beside this HTTP process "
            "(SIGNOFF_WORKER_PROCESSES; 0 when the worker runs inside it).",
            registry=r,
        )
        self.slack_errors = Counter(
            "signoff_slack_api_errors",
            "Failed Slack Web API calls by method and error code (HTTP or connection failures "
            "count as http_<status> or connection).",
            ["method", "code"],
            registry=r,
        )

    def event(self, source: str, outcome: str) -> None:
        self.events.labels(source, outcome).inc()

    def refused(self, source: str, reason: str) -> None:
        self.events.labels(source, "refused").inc()
        self.refusals.labels(source, reason).inc()

    def decided(self, by: str, after: timedelta) -> None:
        # Clocks of different replicas may disagree by a little: never a negative duration.
        self.time_to_decision.labels(by).observe(max(after.total_seconds(), 0.0))

    def slack_error(self, method: str, code: str) -> None:
        known = code in SLACK_CODES or code == "connection" or _HTTP_CODE.fullmatch(code)
        self.slack_errors.labels(method, code if known else "other").inc()

    def exposition(self, workers: Sequence[bytes] = ()) -> bytes:
        """This process's metrics; with `workers` (the expositions its worker processes sent,
        `bot.processes`), one exposition of them all (`merged`)."""
        own = generate_latest(self.registry)
        return merged(own, workers) if workers else own


def merged(own: bytes, others: Sequence[bytes]) -> bytes:
    """Several processes' expositions as one: a series in more than one is summed (counters,
    histogram buckets and sums, and gauges, which here are per-process figures or only set in
    the HTTP process), except `_created` timestamps, where the earliest stands. Prometheus then
    sees one target, as it would a single process."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in (own, *others):
        for family in text_string_to_metric_families(text.decode("utf-8")):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            series = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in series:
                    series[key] = sample.value
                elif sample.name.endswith("_created"):
                    series[key] = min(series[key], sample.value)
                else:
                    series[key] += sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
