"""Training data for prompt tuning: JSONL parsing (with line numbers in every error) and tokenization.

Two record shapes, one per line:

- `{"prompt": "...", "completion": "..."}` — the input is `tokenizer(prompt)` exactly as
  /v1/completions tokenizes a prompt, followed by the completion's tokens and EOS. Loss is on the
  completion tokens (and EOS) only; every other label is -100, as in PEFT's causal-LM recipes.
- `{"messages": [{"role": ..., "content": ...}, ...]}` — rendered with the model's chat template
  the way /v1/chat/completions renders a conversation; loss is on the assistant turns only (their
  content and end-of-turn token). Each assistant turn is tokenized on its own after the templated
  text before it, so the tokens before a turn are exactly what the server feeds at serving time.

Evaluation uses the last supervised span: `prompt_ids` is everything before it, `target` its text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from softserve.tuning.config import TuningConfig

__all__ = ["DatasetError", "Stopped", "Example", "TokenizedExample", "parse_jsonl", "parse_records", "load_examples", "tokenize_examples"]

_ROLES = ("system", "user", "assistant")
_FIELDS = {"prompt", "completion", "messages"}  # a line's fields; anything else is refused, as the API refuses it
_MESSAGE_FIELDS = {"role", "content"}


class DatasetError(ValueError):
    """A problem with training data. `line` is 1-based (the JSONL line, or the item of an inline list)."""

    def __init__(self, message: str, *, line: int | None = None, source: str = "data") -> None:
        self.line = line
        self.source = source
        self.reason = message
        where = f"{source}, line {line}: " if line is not None else f"{source}: "
        super().__init__(where + message)


class Stopped(Exception):
    """`should_stop()` said so (the job was cancelled, or the server stops) while parsing or tokenizing."""


STOP_CHECK_EVERY = 64  # JSONL lines parsed between two `should_stop()` calls


def _check_count(count: int, max_examples: int | None, line: int | None, source: str) -> None:
    if max_examples is not None and count > max_examples:
        raise DatasetError(f"more than {max_examples} examples: the limit (--max-tuning-examples)", line=line,
                           source=source)


@dataclass(frozen=True)
class Example:
    line: int
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content)


@dataclass
class TokenizedExample:
    line: int
    input_ids: list[int]
    labels: list[int]  # -100 where no loss
    prompt_ids: list[int]  # input before the last supervised span (what generation starts from)
    target: str  # text of the last supervised span (exact-match reference)
    num_target_tokens: int = field(default=0)


def _is_text(value: Any) -> bool:
    """A str that is valid Unicode: JSON can carry lone surrogates ("\\ud800") that no tokenizer takes."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(obj: dict, line: int, source: str) -> None:
    for key in ("prompt", "completion"):
        if isinstance(obj.get(key), str) and not _is_text(obj[key]):
            raise DatasetError(f"'{key}' is not valid Unicode (a lone surrogate)", line=line, source=source)


def _check_record(obj: Any, line: int, source: str) -> Example:
    if not isinstance(obj, dict):
        raise DatasetError(f"expected a JSON object, got {type(obj).__name__}", line=line, source=source)
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:  # a misspelt field ("completions") was ignored and the line trained on something else
        raise DatasetError(f"unknown field(s) {unknown}: a line has 'prompt' and 'completion', or 'messages'",
                           line=line, source=source)
    if "messages" in obj:
        extra = set(obj) - {"messages"}
        if extra & {"prompt", "completion"}:
            raise DatasetError("use either 'messages' or 'prompt'/'completion', not both", line=line, source=source)
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DatasetError("'messages' must be a non-empty list", line=line, source=source)
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise DatasetError(f"messages[{i}] must be an object with 'role' and 'content'", line=line, source=source)
            if set(m) - _MESSAGE_FIELDS:
                raise DatasetError(f"messages[{i}] has unknown field(s) {sorted(set(m) - _MESSAGE_FIELDS)}: "
                                   "only 'role' and 'content'", line=line, source=source)
            role, content = m.get("role"), m.get("content")
            if role not in _ROLES:
                raise DatasetError(f"messages[{i}].role must be one of {list(_ROLES)}, got {role!r}", line=line, source=source)
            if not isinstance(content, str):
                raise DatasetError(f"messages[{i}].content must be a string", line=line, source=source)
            if not _is_text(content):
                raise DatasetError(f"messages[{i}].content is not valid Unicode (a lone surrogate)", line=line, source=source)
            out.append((role, content))
        if not any(r == "assistant" and c.strip() for r, c in out):
            raise DatasetError("'messages' has no non-empty assistant turn to learn from", line=line, source=source)
        if out[0][0] == "assistant":
            raise DatasetError("'messages' must not start with an assistant turn", line=line, source=source)
        return Example(line=line, messages=tuple(out))
    missing = [k for k in ("prompt", "completion") if k not in obj]
    if missing:
        raise DatasetError(
            f"missing field(s) {missing}: each line needs 'prompt' and 'completion', or 'messages'", line=line, source=source
        )
    _check_text(obj, line, source)
    prompt, completion = obj["prompt"], obj["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DatasetError("'prompt' and 'completion' must be strings", line=line, source=source)
    if not completion.strip():
        raise DatasetError("'completion' is empty: nothing to learn", line=line, source=source)
    return Example(line=line, prompt=prompt, completion=completion)


def parse_jsonl(text: str, *, source: str = "data", max_examples: int | None = None,
                should_stop: Callable[[], bool] | None = None) -> list[Example]:
    """Parse JSONL text; blank lines are skipped. Raises DatasetError naming the line, also at the line
    past `max_examples` (before parsing the rest), and Stopped when `should_stop()` turns true."""
    examples: list[Example] = []
    text = text.removeprefix("\ufeff")  # a UTF-8 BOM (Windows editors write one) is not part of line 1
    # JSONL lines end at "\n" only: str.splitlines would also split inside strings at U+2028, U+0085, ...
    for lineno, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        _check_count(len(examples) + 1, max_examples, lineno, source)
        if should_stop is not None and lineno % STOP_CHECK_EVERY == 0 and should_stop():
            raise Stopped(source)
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DatasetError(f"invalid JSON ({e.msg} at column {e.colno})", line=lineno, source=source) from None
        except ValueError as e:  # e.g. an integer beyond Python's digit limit
            raise DatasetError(f"invalid JSON ({e})", line=lineno, source=source) from None
        except RecursionError:
            raise DatasetError("invalid JSON (nested too deeply)", line=lineno, source=source) from None
        examples.append(_check_record(obj, lineno, source))
    if not examples:
        raise DatasetError("no examples (the file is empty)", source=source)
    return examples


def parse_records(records: Iterable[Any], *, source: str = "training_data", max_examples: int | None = None) -> list[Example]:
    """Inline examples (a list of dicts, e.g. from the API); item numbers are 1-based like lines."""
    examples = []
    for i, obj in enumerate(records, start=1):
        _check_count(i, max_examples, i, source)
        examples.append(_check_record(obj, i, source))
    if not examples:
        raise DatasetError("no examples (the list is empty)", source=source)
    return examples


def load_examples(path: str | Path) -> list[Example]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DatasetError("file is not UTF-8 text", source=str(p)) from None
    return parse_jsonl(text, source=str(p))


# ---- tokenization ---------------------------------------------------------------------------------
def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special).input_ids)


def _template(tokenizer, messages, *, add_generation_prompt: bool) -> str:
    plain = [{"role": r, "content": c} for r, c in messages]
    return tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, tokenize=False)


def _tokenize_completion(tokenizer, ex: Example, eos_id: int | None, append_eos: bool) -> TokenizedExample:
    prompt_ids = _ids(tokenizer, ex.prompt, special=True)  # exactly what /v1/completions feeds
    target_ids = _ids(tokenizer, ex.completion, special=False)
    if append_eos and eos_id is not None:
        target_ids = target_ids + [eos_id]
    return TokenizedExample(
        line=ex.line,
        input_ids=prompt_ids + target_ids,
        labels=[-100] * len(prompt_ids) + target_ids,
        prompt_ids=prompt_ids,
        target=ex.completion,
        num_target_tokens=len(target_ids),
    )


def _tokenize_chat(tokenizer, ex: Example, source: str) -> TokenizedExample:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DatasetError("'messages' examples need a tokenizer with a chat template", line=ex.line, source=source)
    msgs = list(ex.messages)
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""  # template text covered so far
    last_prompt_ids: list[int] = []
    last_target = ""
    last_n = 0
    for i, (role, content) in enumerate(msgs):
        if role != "assistant":
            continue
        before = _template(tokenizer, msgs[:i], add_generation_prompt=True)
        through = _template(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        if not before.startswith(rendered) or not through.startswith(before):
            raise DatasetError("the chat template does not render this conversation incrementally", line=ex.line, source=source)
        context = _ids(tokenizer, before[len(rendered):], special=False)
        turn = through[len(before):]
        trained = turn.rstrip()  # content + end-of-turn token; the trailing newline is not supervised
        trained_ids = _ids(tokenizer, trained, special=False)
        tail_ids = _ids(tokenizer, turn[len(trained):], special=False) if len(trained) < len(turn) else []
        input_ids += context
        labels += [-100] * len(context)
        last_prompt_ids = list(input_ids)
        input_ids += trained_ids + tail_ids
        labels += trained_ids + [-100] * len(tail_ids)
        rendered = through
        if content.strip():
            last_target, last_n = content, len(trained_ids)
        else:  # an empty assistant turn is context, not a target
            labels[len(labels) - len(trained_ids) - len(tail_ids):] = [-100] * (len(trained_ids) + len(tail_ids))
    return TokenizedExample(
        line=ex.line, input_ids=input_ids, labels=labels, prompt_ids=last_prompt_ids, target=last_target,
        num_target_tokens=last_n,
    )


def tokenize_examples(
    tokenizer,
    examples: list[Example],
    *,
    max_length: int = TuningConfig.max_length,
    append_eos: bool = True,
    source: str = "data",
    should_stop: Callable[[], bool] | None = None,
) -> list[TokenizedExample]:
    """Tokenize; `max_length` counts real tokens (virtual tokens come on top). Too long is an error.
    Stopped when `should_stop()` turns true (checked before each example: a cancel stops a big file fast)."""
    eos_id = tokenizer.eos_token_id
    out = []
    for ex in examples:
        if should_stop is not None and should_stop():  # cheap next to tokenizing one example
            raise Stopped(source)
        if ex.messages is not None:
            t = _tokenize_chat(tokenizer, ex, source)
        else:
            t = _tokenize_completion(tokenizer, ex, eos_id, append_eos)
        if len(t.input_ids) > max_length:
            raise DatasetError(f"example is {len(t.input_ids)} tokens; the limit is {max_length}", line=ex.line, source=source)
        if not t.prompt_ids:
            raise DatasetError("the prompt is empty: generation needs at least one input token", line=ex.line, source=source)
        if all(label == -100 for label in t.labels):
            raise DatasetError("no tokens to learn from", line=ex.line, source=source)
        out.append(t)
    return out
