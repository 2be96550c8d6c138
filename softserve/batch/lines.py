"""The Batch API's JSONL formats (OpenAI's): input lines, output lines and error lines.

Input, one request per line:
    {"custom_id": "t-1", "method": "POST", "url": "/v1/completions", "body": {"model": ..., "prompt": ...}}
Output (one per input line that got a 2xx answer, in input order):
    {"id": "batch_req_...", "custom_id": "t-1", "response": {"status_code": 200, "request_id": ..., "body": {...}}, "error": null}
Error (one per input line that failed, in input order; `error.line` is its 1-based line number):
    {"id": ..., "custom_id": ..., "response": {"status_code": 400, ...} | null, "error": {"code", "message", "line"}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["ENDPOINTS", "BatchLine", "InvalidLine", "LineResult", "parse_input", "count_lines", "output_line",
           "error_line", "line_request_id"]

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
MAX_CUSTOM_ID = 512


@dataclass(frozen=True)
class BatchLine:
    index: int  # 0-based among the file's lines (blank lines included, so index + 1 is the line number)
    custom_id: str
    body: dict[str, Any]

    @property
    def line_number(self) -> int:
        return self.index + 1


@dataclass(frozen=True)
class InvalidLine:
    index: int
    custom_id: str | None
    code: str
    message: str


@dataclass(frozen=True)
class LineResult:
    """What one line's request answered: a status and an OpenAI response body (or error body)."""

    status_code: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300


def count_lines(text: str) -> int:
    """Non-blank lines: the requests a file holds (whether they are valid is checked later)."""
    return sum(1 for line in text.splitlines() if line.strip())


def parse_input(text: str, endpoint: str, check_body: Callable[[str, dict], str | None] | None = None
                ) -> tuple[list[BatchLine | InvalidLine], int]:
    """Every non-blank line as a BatchLine or an InvalidLine naming what is wrong, in file order, and the
    number of lines. `check_body(endpoint, body)` returns why a body is not a valid request (or None)."""
    out: list[BatchLine | InvalidLine] = []
    seen: set[str] = set()
    for index, raw in enumerate(text.splitlines()):
        if not raw.strip():
            continue
        custom_id = None
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as exc:
            out.append(InvalidLine(index, None, "invalid_json", f"line {index + 1}: invalid JSON ({exc.msg})"))
            continue
        if not isinstance(item, dict):
            out.append(InvalidLine(index, None, "invalid_request", f"line {index + 1}: expected a JSON object"))
            continue
        custom_id = item.get("custom_id")
        problem = None
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
            problem = "missing_custom_id", f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} characters"
            custom_id = None
        elif custom_id in seen:
            problem = "duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line"
        elif item.get("method", "POST") != "POST":
            problem = "invalid_method", "method must be POST"
        elif item.get("url") != endpoint:
            problem = "invalid_url", f"url must be the batch's endpoint {endpoint!r}, got {item.get('url')!r}"
        elif not isinstance(item.get("body"), dict):
            problem = "invalid_request", "body must be a JSON object"
        elif item["body"].get("stream"):
            problem = "invalid_request", "stream is not supported in a batch"
        elif set(item) - {"custom_id", "method", "url", "body"}:
            problem = "invalid_request", f"unknown fields {sorted(set(item) - {'custom_id', 'method', 'url', 'body'})}"
        elif check_body is not None:
            message = check_body(endpoint, item["body"])
            if message is not None:
                problem = "invalid_request", message
        if custom_id is not None:
            seen.add(custom_id)
        if problem is not None:
            out.append(InvalidLine(index, custom_id, problem[0], f"line {index + 1}: {problem[1]}"))
        else:
            out.append(BatchLine(index, custom_id, item["body"]))
    return out, len(out)


def line_request_id(batch_id: str, index: int) -> str:
    """Stable per line: a line redone after a restart keeps its id."""
    return f"batch_req_{batch_id.removeprefix('batch_')}_{index + 1}"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def output_line(batch_id: str, line: BatchLine, result: LineResult) -> str:
    rid = line_request_id(batch_id, line.index)
    return _dumps({"id": rid, "custom_id": line.custom_id,
                   "response": {"status_code": result.status_code, "request_id": rid, "body": result.body},
                   "error": None}) + "\n"


def error_line(batch_id: str, index: int, custom_id: str | None, code: str, message: str,
               result: LineResult | None = None) -> str:
    rid = line_request_id(batch_id, index)
    response = None if result is None else {"status_code": result.status_code, "request_id": rid, "body": result.body}
    return _dumps({"id": rid, "custom_id": custom_id, "response": response,
                   "error": {"code": code, "message": message, "line": index + 1}}) + "\n"
