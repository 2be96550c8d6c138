"""Bounds on a structured-output constraint, checked in pure Python before any grammar library sees it.

Deep grammars make llguidance recurse until the stack overflows (issue #26 F1: a 1,000-link `$ref`
chain, 3,000 chained Lark rules) and big ones take seconds to compile (F2: 0.9 s for 5,000
properties). These checks refuse both cheaply, with a message naming the limit; the sandbox
(grammar_sandbox.py) still catches whatever gets past them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from softserve.engine.grammar_worker import GuidedSpecError


@dataclass(frozen=True)
class GrammarLimits:
    max_bytes: int = 64 * 1024  # the constraint's text (schema JSON, regex, Lark, choices as JSON)
    max_depth: int = 128  # JSON objects and arrays nested in one another, counted through `$ref`s
    max_definitions: int = 256  # entries of `$defs` / `definitions`
    max_rules: int = 1000  # Lark rules and terminals
    max_choice_chars: int = 1024  # one guided_choice item


# A Lark rule or terminal definition starts a line: `name:`, `?name:`, `!name:`, `NAME.2:`.
_LARK_RULE = re.compile(r"^[ \t]*[?!]?[A-Za-z_][A-Za-z0-9_]*(\.-?\d+)?[ \t]*:", re.MULTILINE)


def check_limits(kind: str, value: str, limits: GrammarLimits) -> None:
    """GuidedSpecError naming the limit when the constraint is too big or too deep to compile safely."""
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise GuidedSpecError(f"the constraint is {size} bytes; the limit is {limits.max_bytes} (--guided-max-bytes)")
    if kind == "json_schema":
        _check_schema(value, limits)
    elif kind == "grammar":
        rules = len(_LARK_RULE.findall(value))
        if rules > limits.max_rules:
            raise GuidedSpecError(f"the grammar has {rules} rules; the limit is {limits.max_rules} (--guided-max-rules)")
    elif kind == "choice":
        try:
            choices = json.loads(value)
        except ValueError as exc:
            raise GuidedSpecError(f"choices are not a JSON list: {exc}") from exc
        if isinstance(choices, list):
            longest = max((len(c) for c in choices if isinstance(c, str)), default=0)
            if longest > limits.max_choice_chars:
                raise GuidedSpecError(f"a choice has {longest} characters; the limit is {limits.max_choice_chars}")


def _check_schema(text: str, limits: GrammarLimits) -> None:
    try:
        schema = json.loads(text)
    except RecursionError as exc:
        raise GuidedSpecError(f"the schema is nested deeper than {limits.max_depth} levels (--guided-max-depth)") from exc
    except ValueError as exc:
        raise GuidedSpecError(f"the schema is not JSON: {exc}") from exc
    definitions = 0
    for key in ("$defs", "definitions"):
        found = schema.get(key) if isinstance(schema, dict) else None
        if isinstance(found, dict):
            definitions += len(found)
    if definitions > limits.max_definitions:
        raise GuidedSpecError(f"the schema has {definitions} definitions; the limit is {limits.max_definitions} "
                              "(--guided-max-definitions)")
    try:
        _SchemaDepth(schema, limits.max_depth).check()
    except RecursionError as exc:  # only with --guided-max-depth raised near Python's own recursion limit
        raise GuidedSpecError(f"the schema is nested too deeply (--guided-max-depth {limits.max_depth})") from exc


class _SchemaDepth:
    """The deepest nesting of JSON objects and arrays, following local `$ref`s (`#`, `#/$defs/x`, any `#/...` pointer).

    A reference back into the path being walked is recursion, which llguidance handles lazily: it adds
    nothing. Each target is re-walked only when reached deeper than before, and the walk stops at the
    limit, so the work is at most limit x nodes, and Python's own recursion stays under the limit.
    """

    def __init__(self, root, limit: int) -> None:
        self.root, self.limit = root, limit
        self.deepest_at: dict[str, int] = {}

    def check(self) -> None:
        self._walk(self.root, 1, frozenset({"#"}))

    def _fail(self) -> None:
        raise GuidedSpecError(f"the schema is nested deeper than {self.limit} levels, counting through $refs "
                              "(--guided-max-depth)")

    def _walk(self, node, depth: int, path: frozenset[str]) -> None:
        if depth > self.limit:
            self._fail()
        if isinstance(node, list):
            for item in node:
                if isinstance(item, (dict, list)):
                    self._walk(item, depth + 1, path)
            return
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#") and ref not in path:
            if self.deepest_at.get(ref, 0) < depth:
                self.deepest_at[ref] = depth
                target = self._resolve(ref)
                if target is not None:
                    self._walk(target, depth + 1, path | {ref})
        for key, child in node.items():
            if key != "$ref" and isinstance(child, (dict, list)):
                self._walk(child, depth + 1, path)

    def _resolve(self, ref: str):
        node = self.root
        for part in ref[1:].split("/")[1:] if ref != "#" else ():
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None  # llguidance reports the dangling reference
        return node
