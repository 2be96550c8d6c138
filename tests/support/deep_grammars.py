"""Hostile structured-output constraints: deep and big shapes that made llguidance overflow its stack
(SIGSEGV, issue #26 F1) or take seconds to compile (F2). Only ever compile the crashing ones in a
sandbox or server subprocess, never in the pytest process.

Each generator takes a size and returns (kind, value) as the API's GuidedSpec carries them.
"""

from __future__ import annotations

import json


def ref_chain(n: int) -> tuple[str, str]:
    """`$defs` d0 -> d1 -> ... -> dn through one property each (1,000 links crashed)."""
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(n)}
    defs[f"d{n}"] = {"type": "integer"}
    return "json_schema", json.dumps({"$defs": defs, "$ref": "#/$defs/d0"})


def _wrapped(n: int, before: str, after: str) -> str:
    # Text, not json.dumps: Python's encoder itself stops at ~1,000 levels.
    return before * n + '{"type": "integer"}' + after * n


def nested_arrays(n: int) -> tuple[str, str]:
    return "json_schema", _wrapped(n, '{"type": "array", "items": ', "}")


def nested_objects(n: int) -> tuple[str, str]:
    return "json_schema", _wrapped(n, '{"type": "object", "required": ["a"], "properties": {"a": ', "}}")


def any_of_chain(n: int) -> tuple[str, str]:
    return "json_schema", _wrapped(n, '{"anyOf": [{"type": "string"}, ', "]}")


def recursive_ref_nest(n: int) -> tuple[str, str]:
    """A recursive definition (legal and unbounded) reached through a chain of n wrappers."""
    defs = {"node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}}
    for i in range(n):
        defs[f"w{i}"] = {"anyOf": [{"$ref": f"#/$defs/w{i + 1}" if i + 1 < n else "#/$defs/node"}, {"type": "null"}]}
    return "json_schema", json.dumps({"$defs": defs, "$ref": "#/$defs/w0" if n else "#/$defs/node"})


def many_properties(n: int) -> tuple[str, str]:
    """n required properties: big, flat, slow to compile (5,000 took 0.9 s)."""
    props = {f"property_{i:05d}": {"type": "integer"} for i in range(n)}
    return "json_schema", json.dumps({"type": "object", "properties": props, "required": list(props)})


def lark_chain(n: int) -> tuple[str, str]:
    """`start: r0`, `r0: r1`, ... `rn: "a"` (3,000 rules crashed)."""
    return "grammar", "start: r0\n" + "".join(f"r{i}: r{i + 1}\n" for i in range(n)) + f'r{n}: "a"\n'


def lark_alternation_chain(n: int) -> tuple[str, str]:
    return "grammar", "start: r0\n" + "".join(f'r{i}: "b" | r{i + 1} "c"\n' for i in range(n)) + f'r{n}: "a"\n'


def lark_nesting(n: int) -> tuple[str, str]:
    return "grammar", "start: " + "(" * n + '"a"' + ")" * n + "\n"


def regex_nesting(n: int) -> tuple[str, str]:
    return "regex", "(" * n + "a" + ")" * n


GENERATORS = {f.__name__: f for f in (ref_chain, nested_arrays, nested_objects, any_of_chain, recursive_ref_nest,
                                      many_properties, lark_chain, lark_alternation_chain, lark_nesting, regex_nesting)}

# Sizes that crashed llguidance on an 8 MB stack (before the fix, the server died on the first).
CRASHERS = [("ref_chain", 1000), ("ref_chain", 3000), ("lark_chain", 3000), ("lark_alternation_chain", 3000)]
# Every shape, at sizes around and far past the limits: the server must answer each with 200 or 400.
CATALOGUE = [(name, n) for name in GENERATORS for n in (10, 300, 3000)] + [("many_properties", 5000)]
