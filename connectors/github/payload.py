"""The parts of GitHub's webhook payloads Signoff reads, as pydantic models.

Only the fields used are declared; the rest of GitHub's (large, growing) payload is ignored, so
a new field on GitHub's side never breaks intake. Field names and types follow GitHub's own
schema of the `deployment_protection_rule` `requested` webhook (@octokit/openapi-webhooks,
vendored under tests/fixtures/reference/github/), which the fixture is checked against.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class User(_Model):
    login: Name
    id: int
    name: str | None = None
    email: str | None = None
    html_url: str | None = None


class Owner(_Model):
    login: Name


class Repository(_Model):
    name: Name
    full_name: Name
    owner: Owner
    html_url: str


class Installation(_Model):
    id: int


class Deployment(_Model):
    id: int
    sha: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    ref: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    task: str = "deploy"
    environment: str = ""
    description: str | None = None
    created_at: AwareDatetime | None = None
    production_environment: bool | None = None
    transient_environment: bool | None = None
    creator: User | None = None


class PullRequest(_Model):
    number: int
    title: str = ""
    html_url: str = ""
    user: User | None = None


class Envelope(_Model):
    """Every delivery Signoff reads has an `action`; most of the rest depends on the event."""

    action: str = ""


class DeploymentProtectionRuleRequested(_Model):
    """`deployment_protection_rule` with action `requested`. GitHub's schema leaves
    `environment`, `deployment`, `deployment_callback_url` and `installation` optional; Signoff
    cannot show or answer a request without them, so here they are required."""

    action: str
    environment: Name
    event: str = ""
    deployment_callback_url: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    deployment: Deployment
    pull_requests: Annotated[list[PullRequest], Field(max_length=100)] = Field(default_factory=list)
    repository: Repository
    installation: Installation
    sender: User
