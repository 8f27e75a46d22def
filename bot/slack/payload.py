"""The shape of what Slack sends, checked before Bolt sees it.

Bolt trusts a signed payload's shape: `"actions": null` in a signed block_actions payload made its
listener matching raise (`to_action` indexes `body["actions"][0]`), and Bolt answers that with a
500. Our listeners read `user`, `container`, `view.state` as objects too. So a signed payload
whose parts are not the types Slack documents is refused here with a 400 naming the part; only
the parts Bolt and Signoff read are declared, everything else passes through untouched.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from connectors.webhook.intake import describe_validation_error


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Scope(_Part):
    """The fields Bolt reads to find the team, user and channel (slack_bolt.request.internals),
    at the top level and again inside `event`, `message` and `authorizations[0]`: each is an
    object or, where Slack sends ids bare, a string."""

    enterprise: str | _Part | None = None
    team: str | _Part | None = None
    user: str | _Part | None = None
    channel: str | _Part | None = None
    message: _Scope | None = None
    previous_message: _Scope | None = None
    item: _Part | None = None
    assistant_thread: _Part | None = None
    function_data: _Part | None = None
    authorizations: list[_Scope] | None = None
    response_urls: list[_Part] | None = None
    event: _Event | None = None

    @model_validator(mode="before")
    @classmethod
    def _present_means_not_null(cls, data: Any) -> Any:
        # Bolt reads `len(payload["response_urls"])` and `payload.get("event", {}).get(...)`.
        if isinstance(data, dict):
            for key in ("response_urls", "event"):
                if key in data and data[key] is None:
                    raise ValueError(f"{key} is null")
        return data


class _Event(_Scope):
    type: str = ""


class _Action(_Part):
    # Required: Bolt's listener matching indexes `action["action_id"]` of every action.
    action_id: str
    block_id: str | None = None
    value: str | None = None


class _State(_Part):
    # block id -> action id -> the input's state (its value, its selected option...).
    values: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)


class _View(_Part):
    callback_id: str = ""
    private_metadata: str | None = None
    state: _State | None = None


class Interactive(_Scope):
    """An interactivity payload (`payload=` form field): buttons, modals. Signoff's listeners
    read `user`, `container` and `channel` as objects."""

    type: str
    user: _Part | None = None
    container: _Part | None = None
    channel: _Part | None = None
    trigger_id: str | None = None
    actions: Annotated[list[_Action], Field(min_length=1)] | None = None
    view: _View | None = None


class EventsApi(_Scope):
    """An Events API body (JSON)."""

    type: str


def shape_problem(body: dict[str, Any]) -> str | None:
    """Why Bolt's parsed `body` is not shaped like anything Slack sends, or None."""
    if "command" in body:
        return None  # a slash command: flat form fields, all strings
    model: type[_Part] = EventsApi if "event" in body or "challenge" in body else Interactive
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        return describe_validation_error(exc)
    if isinstance(parsed, Interactive):
        if parsed.type == "block_actions" and parsed.actions is None:
            return "actions: Field required"
        if parsed.type.startswith("view_") and parsed.view is None:
            return "view: Field required"
    return None
