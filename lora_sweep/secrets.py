"""Secrets never leave the process: URL passwords and the values of secret environment variables are
masked wherever lora_sweep writes text others read (MLflow params, tags and artifacts, record.json, the
sweep summary, the report, error messages and log lines).

Masked: the password of any ``scheme://user:password@host`` URL (``user:***@``), and every occurrence of
the value of a known secret variable (``HF_TOKEN``, ``MLFLOW_TRACKING_PASSWORD``, ``PGPASSWORD``, ...) or of
any variable whose name ends in ``_TOKEN``, ``_PASSWORD``, ``_SECRET`` or ``_KEY`` and whose value has at
least 8 characters (shorter values of such loosely named variables would mask ordinary words).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
SECRET_VARIABLES = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PGPASSWORD",
    "AWS_SECRET_ACCESS_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
)
SECRET_SUFFIXES = ("_TOKEN", "_PASSWORD", "_SECRET", "_KEY")
MIN_SUFFIX_LENGTH = 8
# A named secret this short would mask ordinary text ("pw" in "pwd"); URL passwords are masked by position
# anyway.
MIN_NAMED_LENGTH = 4

# scheme:/[/]user:password@ -- also in URLs too malformed for urlsplit ("postgresql:/u:pw@h/db"); the password
# stops at "@", "/" or whitespace, so "http://host:5000/a@b" is left alone
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*:/*[^:/@\s]*:)(?P<password>[^@/\s]+)@")


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values to mask, longest first (a secret that contains another is masked whole)."""
    environ = os.environ if environ is None else environ
    values = set()
    for name, value in environ.items():
        upper = name.upper()
        if upper in SECRET_VARIABLES and len(value) >= MIN_NAMED_LENGTH:
            values.add(value)
        elif upper.endswith(SECRET_SUFFIXES) and len(value) >= MIN_SUFFIX_LENGTH:
            values.add(value)
    return sorted(values, key=len, reverse=True)


def password_of(url: str) -> str | None:
    match = _URL_PASSWORD.search(url)
    return match["password"] if match else None


def redact_url(url: str) -> str:
    """``postgresql://user:pw@host/db`` -> ``postgresql://user:***@host/db``; other text unchanged."""
    return _URL_PASSWORD.sub(lambda m: m["head"] + MASK + "@", url)


def redact_text(text: str, values: list[str] | None = None) -> str:
    text = redact_url(text)
    for value in secret_values() if values is None else values:
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact(obj: Any, values: list[str] | None = None) -> Any:
    """``obj`` with every secret masked: strings, and recursively dict keys/values, lists and tuples.

    Anything else (numbers, None, paths) comes back as it is.
    """
    values = secret_values() if values is None else values
    if isinstance(obj, str):
        return redact_text(obj, values)
    if isinstance(obj, Mapping):
        return {redact(k, values): redact(v, values) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v, values) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact(v, values) for v in obj)
    return obj


def install_log_redaction() -> None:
    """Mask secrets in every log record of this process, whichever logger or handler writes it.

    A record factory rather than a handler filter: Hydra reconfigures the handlers for every job, and its
    launcher logs each job's overrides (a storage URL or a token given on the command line).
    """
    import logging

    factory = logging.getLogRecordFactory()
    if getattr(factory, "lora_sweep_redacts", False):
        return

    def make_record(*args, **kwargs):
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's own problem, leave it as it is
            return record
        masked = redact_text(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return record

    make_record.lora_sweep_redacts = True
    logging.setLogRecordFactory(make_record)
