"""kimi_jax.evaluation.schema: the validator's keywords, and that schema.json only uses what it checks."""

from __future__ import annotations

import json
import math

import pytest

from kimi_jax.evaluation.schema import SchemaError, load_schema, validate, validate_results

SCHEMA = {
    "type": "object",
    "required": ["a", "b"],
    "additionalProperties": False,
    "properties": {
        "a": {"type": "integer", "minimum": 0},
        "b": {"$ref": "#/$defs/section"},
        "c": {"type": "array", "minItems": 1, "items": {"type": ["number", "null"], "maximum": 1}},
        "d": {"enum": ["x", "y"]},
        "e": {"type": "string", "pattern": "^[0-9a-f]{4}$"},
        "f": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["g"]}]},
    },
    "$defs": {"section": {
        "if": {"properties": {"status": {"const": "skipped"}}, "required": ["status"]},
        "then": {"type": "object", "required": ["reason"], "properties": {"reason": {"type": "string"}}},
        "else": {"type": "object", "required": ["value"], "properties": {"value": {"type": "number"}}}}},
}


def test_valid_document():
    assert validate({"a": 1, "b": {"status": "ok", "value": 2.5}, "c": [0.5, None], "d": "x", "e": "00af",
                     "f": None}, SCHEMA) == []
    assert validate({"a": 0, "b": {"status": "skipped", "reason": "flag"}, "f": {"g": 1}}, SCHEMA) == []


@pytest.mark.parametrize("doc,message", [
    ({"b": {"status": "ok", "value": 1}}, "$.a: required field is missing"),
    ({"a": True, "b": {"status": "ok", "value": 1}}, "$.a: expected integer, got boolean"),
    ({"a": -1, "b": {"status": "ok", "value": 1}}, "$.a: must be >= 0, got -1"),
    ({"a": 1, "b": {"status": "ok", "value": "1"}}, "$.b.value: expected number, got string"),
    ({"a": 1, "b": {"status": "ok"}}, "$.b.value: required field is missing"),
    ({"a": 1, "b": {"status": "skipped"}}, "$.b.reason: required field is missing"),
    ({"a": 1, "b": {"status": "ok", "value": math.nan}}, "$.b.value: expected number, got non-finite number nan"),
    ({"a": 1, "b": {"status": "ok", "value": 1}, "c": []}, "$.c: must have at least 1 items"),
    ({"a": 1, "b": {"status": "ok", "value": 1}, "c": [2]}, "$.c[0]: must be <= 1, got 2"),
    ({"a": 1, "b": {"status": "ok", "value": 1}, "d": "z"}, '$.d: must be one of ["x", "y"], got "z"'),
    ({"a": 1, "b": {"status": "ok", "value": 1}, "e": "00AF"}, "$.e: \"00AF\" does not match"),
    ({"a": 1, "b": {"status": "ok", "value": 1}, "f": {}}, "$.f.g: required field is missing"),
    ({"a": 1, "b": {"status": "ok", "value": 1}, "zz": 0}, "$.zz: unexpected field"),
])
def test_violations_name_the_field(doc, message):
    errors = validate(doc, SCHEMA)
    assert errors and errors[0].startswith(message), errors


def test_unsupported_keywords_and_refs_are_errors():
    with pytest.raises(SchemaError, match="unsupported keyword"):
        validate(1, {"type": "integer", "multipleOf": 2})
    with pytest.raises(SchemaError, match="does not resolve"):
        validate(1, {"$ref": "#/$defs/missing"})
    assert validate(1, {"not": {"type": "integer"}})[0].startswith("$: must not match")
    assert validate(3, {"oneOf": [{"type": "integer"}, {"minimum": 0}]})[0].startswith("$: matches 2")


def _walk(node, path="$"):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            if key in ("properties", "$defs"):
                for name, sub in value.items():
                    yield from _walk(sub, f"{path}.{key}.{name}")
            elif isinstance(value, (dict, list)) and key not in ("enum", "const", "required"):
                yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            yield from _walk(sub, f"{path}[{i}]")


def test_schema_file_uses_only_checked_keywords_and_resolving_refs():
    from kimi_jax.evaluation.schema import _Validator

    schema = load_schema()
    checker = _Validator(schema)
    refs = 0
    for path, node in _walk(schema):
        # validating anything against every sub-schema checks its keywords and resolves its $refs
        for probe in (None, {}, [], 0, "x"):
            checker.errors(probe, node, path)
        refs += "$ref" in node
    assert refs > 10
    with pytest.raises(SchemaError, match=r"^\$\.schema_version: required field is missing"):
        validate_results({})
    json.dumps(schema)  # plain JSON
