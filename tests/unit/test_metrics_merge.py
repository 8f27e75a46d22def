"""`bot.metrics.merged`: the HTTP process's and its worker processes' metrics as one target."""

from __future__ import annotations

from datetime import timedelta

from prometheus_client.parser import text_string_to_metric_families

from bot.metrics import Metrics, merged


def samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in found, f"{key} appears twice"
            found[key] = sample.value
    return found


def test_series_of_several_processes_are_summed_and_the_earliest_creation_stands() -> None:
    http, worker, other = Metrics(), Metrics(), Metrics()
    http.event("webhook", "accepted")
    http.pending.set(7)
    http.slack_error("chat.postEphemeral", "ratelimited")
    worker.outbox.labels("webhook.callback", "done").inc(2)
    other.outbox.labels("webhook.callback", "done").inc(3)
    other.outbox.labels("slack.post_card", "dead").inc()
    worker.slack_error("chat.postEphemeral", "ratelimited")
    http.decided("vote", timedelta(seconds=5))
    worker.decided("expiry", timedelta(hours=2))
    other.decided("vote", timedelta(seconds=50))

    text = merged(http.exposition(), [worker.exposition(), other.exposition()])
    found = samples(text)

    def get(name: str, **labels: str) -> float:
        return found[(name, frozenset(labels.items()))]

    done = {"kind": "webhook.callback", "outcome": "done"}
    assert get("signoff_outbox_attempts_total", **done) == 5.0
    assert get("signoff_outbox_attempts_total", kind="slack.post_card", outcome="dead") == 1.0
    assert get("signoff_events_received_total", source="webhook", outcome="accepted") == 1.0
    ratelimited = {"method": "chat.postEphemeral", "code": "ratelimited"}
    assert get("signoff_slack_api_errors_total", **ratelimited) == 2.0
    # Only the HTTP process sets the pending gauge; the workers' zero adds nothing.
    assert get("signoff_requests_pending") == 7.0
    assert get("signoff_time_to_decision_seconds_count", by="vote") == 2.0
    assert get("signoff_time_to_decision_seconds_sum", by="vote") == 55.0
    assert get("signoff_time_to_decision_seconds_bucket", by="vote", le="10.0") == 1.0
    assert get("signoff_time_to_decision_seconds_bucket", by="vote", le="60.0") == 2.0
    assert get("signoff_time_to_decision_seconds_count", by="expiry") == 1.0
    created = min(
        samples(m.exposition())[("signoff_outbox_attempts_created", frozenset(done.items()))]
        for m in (worker, other)
    )
    assert get("signoff_outbox_attempts_created", **done) == created
    # Still one family per name, each with its type.
    assert text.count(b"# TYPE signoff_outbox_attempts_total counter") == 1
    assert text.count(b"# TYPE signoff_time_to_decision_seconds histogram") == 1


def test_without_workers_the_exposition_is_the_process_own() -> None:
    metrics = Metrics()
    metrics.event("github", "refused")
    assert metrics.exposition() == metrics.exposition(())
    assert samples(metrics.exposition([Metrics().exposition()])) == samples(metrics.exposition())
