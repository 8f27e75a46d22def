"""Cards for alerts: the Silence… button (only when a silence can be made), the silence modal,
a vote that picked a silence, and a request cancelled because its alert resolved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bot.slack.cards import APPROVE_ACTION, DETAILS_ACTION, REJECT_ACTION, SILENCE_ACTION
from bot.slack.modals import SILENCE_CALLBACK, build_silence_modal
from connectors.alertmanager.intake import receive
from connectors.alertmanager.silences import DURATIONS
from tests.unit.test_cards import (
    ALICE,
    T0,
    actions,
    all_text,
    assert_golden,
    card_payload,
    decided,
    make_view,
)

FIXTURES = Path(__file__).resolve().parents[2] / "connectors" / "alertmanager" / "fixtures"


def alert(*, silences: bool = True) -> dict[str, Any]:
    delivery = receive((FIXTURES / "firing.json").read_bytes(), {}, token=None, silences=silences)
    body = delivery.events[0].model_dump(mode="json")
    body["received_at"] = T0.isoformat()
    return body


def buttons(payload: dict[str, Any]) -> list[str]:
    [block] = actions(payload)
    return [element["action_id"] for element in block["elements"]]


def test_pending_alert_card_offers_a_silence() -> None:
    payload = card_payload(make_view(alert()))
    assert_golden("card_pending_alert", payload)
    assert buttons(payload) == [APPROVE_ACTION, REJECT_ACTION, SILENCE_ACTION, DETAILS_ACTION]
    text = all_text(payload)
    assert "DiskRunningFull: please check the instance example1" in text
    assert "alertmanager / alert" in text and "Critical risk" in text
    assert "<http://prometheus.example:9090/graph?g0.expr=up|Source>" in text


def test_no_silence_button_without_alertmanager_url_or_for_other_sources() -> None:
    assert SILENCE_ACTION not in buttons(card_payload(make_view(alert(silences=False))))


def test_silence_modal() -> None:
    modal = build_silence_modal(make_view(alert()), channel="C0OPS", ts="1700000000.000100")
    assert_golden("modal_silence", modal)
    assert modal["callback_id"] == SILENCE_CALLBACK
    assert json.loads(modal["private_metadata"]) == {
        "r": "r_test0001",
        "v": "2026-11-22T01:48:39.509722745Z",
        "c": "C0OPS",
        "ts": "1700000000.000100",
    }
    [select] = [b["element"] for b in modal["blocks"] if b.get("block_id") == "duration"]
    assert [option["value"] for option in select["options"]] == list(DURATIONS)
    assert select["initial_option"]["value"] == "4h"


def test_a_vote_that_picked_a_silence_says_so() -> None:
    view = make_view(alert(), votes=[{**ALICE, "params": {"silence": "12h"}}])
    assert "approved <!date^" in all_text(card_payload(view))
    assert "with a 12h silence" in all_text(card_payload(view))


def test_resolved_alert_card_says_resolved_and_has_no_buttons() -> None:
    view = make_view(
        alert(), **decided("cancelled", reason="alert resolved at 2026-11-22 04:15:48 UTC")
    )
    payload = card_payload(view)
    assert_golden("card_cancelled_resolved", payload)
    assert actions(payload) == []
    text = all_text(payload)
    assert ":no_entry_sign: *Cancelled*" in text
    assert ":no_entry_sign: *Cancelled* <!date^" in text
    assert "UTC>: alert resolved at 2026-11-22 04:15:48 UTC (withdrawn by the source)" in text
    assert "Reason" not in text, "said once, in the outcome line"
