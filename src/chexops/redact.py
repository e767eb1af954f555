"""Secrets never reach params, dvc.lock, MLflow or logs: URLs and free text with credentials
removed before they are shown or stored."""
from __future__ import annotations

import re
from urllib.parse import urlsplit


def redact_url(url: str) -> str:
    """scheme://host[:port]/path only: user:password@, the query string (signed URLs carry
    tokens there) and the fragment are dropped; a query shows as `?***`. Keeps the slashes
    of URIs with no host (`sqlite:////abs/mlflow.db`). An unparseable URL shows as a placeholder."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
        if ":" in host:                    # IPv6 literal
            host = f"[{host}]"
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:                     # bad port, bad brackets: show nothing of it
        return "<unparseable URL>"
    if not parts.scheme:
        return parts.path
    slashes = "//" if url.strip()[len(parts.scheme) + 1:].startswith("//") else ""
    return f"{parts.scheme}:{slashes}{host}{parts.path}" + ("?***" if parts.query else "")


# secrets that DVC or a library may echo: user:password@ and queries in URLs, key=value pairs,
# AWS key ids
_SECRETS = (
    (re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s]+@"), r"\1***@"),
    # a URL's query string: signed URLs carry their signature and token there
    (re.compile(r"(\b[a-zA-Z][\w+.-]*://[^\s?#'\"]*)\?[^\s'\"]+"), r"\1?***"),
    (re.compile(r"(?i)\b(access_key_id|secret_access_key|session_token|aws_[a-z_]*key[a-z_]*|"
                r"password|passwd|token|secret|credential[a-z_]*)(['\"]?\s*[=:]\s*['\"]?)"
                r"[^\s'\",;]+"), r"\1\2***"),
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{12,}\b"), "***"),
)


def redact_text(text: str) -> str:
    """`text` with credentials it may carry replaced by ***."""
    for pattern, repl in _SECRETS:
        text = pattern.sub(repl, text)
    return text
