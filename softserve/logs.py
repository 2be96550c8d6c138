"""Structured JSON logs: one object per line; request lines carry id, tenant, prompt, tokens, latency.

Never log API keys or prompt tensors: only names, versions and counts reach the log.
"""

from __future__ import annotations

import json
import logging
import re
import uuid

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
request_log = logging.getLogger("softserve.request")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            payload.update(extra)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False, default=str)


def configure_logging(level: str, json_logs: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def request_id_from(header: str | None) -> str:
    """Use the caller's X-Request-ID when it is sane, else make one."""
    if header and _REQUEST_ID_RE.fullmatch(header):
        return header
    return uuid.uuid4().hex


def log_request(**fields) -> None:
    request_log.info("request", extra={"fields": fields})
