"""`signoff serve` with the GitHub connector half-configured stops with one line, before it
touches the database."""

from __future__ import annotations

from pathlib import Path

from tests.github_support import WEBHOOK_SECRET
from tests.support import run_signoff


def test_github_without_its_app_stops_serve_with_one_line(
    serve_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**serve_env, "GITHUB_WEBHOOK_SECRET": WEBHOOK_SECRET}
    env = {k: v for k, v in env.items() if not k.startswith("GITHUB_APP_")}
    result = run_signoff("serve", env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "signoff: GITHUB_APP_ID is required for answering GitHub deployment protection rules "
        "but is not set"
    ]
    assert not (tmp_path / "signoff.db").exists()
