"""The static bounds on structured-output constraints (issue #26 F1/F2), checked before any compile.

Pure Python on the constraint text: safe to run on the hostile shapes in the pytest process."""

from __future__ import annotations

import json

import pytest

from tests.support import deep_grammars as D
from softserve.engine.grammar_limits import GrammarLimits, check_limits
from softserve.engine.guided import GrammarCompiler, GuidedSpecError
from softserve.engine.request import GuidedSpec

LIMITS = GrammarLimits()
RECURSIVE_TREE = {"$defs": {"node": {"type": "object", "properties": {
    "name": {"type": "string"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}}, "$ref": "#/$defs/node"}
SELF_REFERENCE = {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}}


@pytest.mark.parametrize("name,n", D.CRASHERS + [("nested_arrays", 1000), ("nested_objects", 3000),
                                                 ("any_of_chain", 3000), ("recursive_ref_nest", 300),
                                                 ("many_properties", 5000), ("lark_chain", 1500)])
def test_deep_and_big_constraints_are_refused_before_compiling(name, n):
    kind, value = D.GENERATORS[name](n)
    with pytest.raises(GuidedSpecError, match="limit|deeper|deeply"):
        check_limits(kind, value, LIMITS)


@pytest.mark.parametrize("kind,value", [
    ("json_schema", json.dumps(RECURSIVE_TREE)),  # recursion is fine: llguidance expands it lazily
    ("json_schema", json.dumps(SELF_REFERENCE)),
    D.ref_chain(20),
    D.nested_objects(20),
    D.many_properties(300),
    D.lark_chain(300),
    ("regex", "[a-z]{1,8}"),
    ("choice", json.dumps(["yes", "no"])),
])
def test_ordinary_constraints_pass_the_bounds(kind, value):
    check_limits(kind, value, LIMITS)


def test_a_ref_chain_counts_every_level_it_reaches():
    """Each link is shallow; the depth is the chain's (d0 -> d1 -> ...), not one definition's."""
    kind, value = D.ref_chain(60)  # 61 definitions, each 3 levels deep: ~180 levels through the refs
    with pytest.raises(GuidedSpecError, match="through \\$refs"):
        check_limits(kind, value, LIMITS)
    check_limits(kind, value, GrammarLimits(max_depth=400))


def test_choice_items_and_bytes_are_capped():
    with pytest.raises(GuidedSpecError, match="characters"):
        check_limits("choice", json.dumps(["a" * 2000]), LIMITS)
    with pytest.raises(GuidedSpecError, match="bytes"):
        check_limits("regex", "a" * 100, GrammarLimits(max_bytes=64))


def test_compiler_compiles_once_and_shares_it(tokenizer):
    """One compile per constraint however many requests and choices use it; each gets its own matcher."""
    compiler = GrammarCompiler(tokenizer)
    spec = GuidedSpec("choice", json.dumps(["yes", "no"]))
    first = compiler.compile(spec)
    assert compiler.compile(GuidedSpec("choice", json.dumps(["yes", "no"]))) is first
    a, b = first.new_matcher(), first.new_matcher()
    assert a is not b and a.consume_tokens(tokenizer("yes", add_special_tokens=False).input_ids)
    assert not b.is_stopped() and not first.template.is_stopped()  # copies do not share parse state
    with pytest.raises(GuidedSpecError):
        compiler.compile(GuidedSpec(*D.lark_chain(3000)))  # refused by the bounds: never compiled here
