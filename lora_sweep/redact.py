"""Passwords out of everything shown or tracked: storage and tracking URLs carry ``user:password@``
(``postgresql://sweeper:pw@db/optuna``), and MLflow params, artifacts and error lines are read by others."""

from __future__ import annotations

import re
from typing import Any

# scheme, then user:password@ wherever it stands, also in URLs too malformed for urlsplit ("postgresql:/u:pw@h/db")
_CREDENTIALS = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*:/*[^:/@\s]*):(?P<password>[^@\s]*)@")


def password_of(url: str) -> str | None:
    match = _CREDENTIALS.match(url)
    return match.group("password") if match and match.group("password") else None


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ***."""
    return _CREDENTIALS.sub(lambda m: f"{m.group('head')}:***@", url, count=1) if password_of(url) else url


def redact_text(text: str, url: str) -> str:
    """``text`` with the password of ``url`` replaced by ***, wherever a driver quoted it."""
    password = password_of(url)
    return text.replace(password, "***") if password else text


def redact_tree(value: Any) -> Any:
    """Every string in a nested dict/list that is a URL with a password, redacted."""
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v) for v in value]
    return redact_url(value) if isinstance(value, str) else value
