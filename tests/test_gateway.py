"""The API token's sources (unexrl.serve.gateway.api_token), without a running service."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from unexrl.serve.gateway import ENV_TOKEN, ENV_TOKEN_FILE, TokenError, api_token


def test_the_embedded_default_generates_one_private_token_and_says_where(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="unexrl.serve.gateway"):
        token = api_token({}, tmp_path / "home")
    path = tmp_path / "home" / "api-token"
    assert path.read_text().strip() == token and len(token) >= 32
    assert path.stat().st_mode & 0o077 == 0  # readable by its owner only
    assert str(path) in caplog.text
    assert api_token({}, tmp_path / "home") == token  # every worker reads the same one
    assert list((tmp_path / "home").iterdir()) == [path]  # no temporary file left behind


def test_a_configured_token_wins_and_a_weak_one_is_refused(tmp_path: Path) -> None:
    strong = "s" * 40
    assert api_token({ENV_TOKEN: strong, ENV_TOKEN_FILE: "/nonexistent"}, tmp_path) == strong
    (tmp_path / "token").write_text(strong + "\n")
    assert api_token({ENV_TOKEN_FILE: str(tmp_path / "token")}, tmp_path) == strong
    assert not (tmp_path / "api-token").exists()  # nothing generated when one is configured
    with pytest.raises(TokenError, match="at least 32 characters"):
        api_token({ENV_TOKEN: "short"}, tmp_path)
    with pytest.raises(TokenError, match="UNEXRL_API_TOKEN_FILE=/nonexistent"):
        api_token({ENV_TOKEN_FILE: "/nonexistent"}, tmp_path)
