"""A small JSON Schema validator (the subset `schema.json` uses) and `validate_results` for evaluation JSON files.

Supported keywords: ``type`` (one or a list of: object, array, string, integer, number, boolean, null), ``enum``,
``const``, ``properties``, ``required``, ``additionalProperties`` (bool or schema), ``items``, ``minItems``,
``maxItems``, ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``, ``minLength``, ``pattern``,
``allOf``, ``anyOf``, ``oneOf``, ``not``, ``if``/``then``/``else`` and local ``$ref`` (``#/$defs/name``);
annotations (``$schema``, ``$id``, ``$defs``, ``title``, ``description``, ``$comment``) are ignored. Any other
keyword is an error, so the schema never silently relies on something unchecked. Numbers must be finite (JSON has
no NaN or Infinity) and booleans are never integers.

Errors name the offending field as a path from the document root, e.g.
``$.core.perplexity: expected number, got string``.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any
from kimi_jax.errors import KimiJaxError

SCHEMA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema.json")

_ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description", "$comment", "examples", "default"}
_KEYWORDS = {"type", "enum", "const", "properties", "required", "additionalProperties", "items", "minItems",
             "maxItems", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "pattern",
             "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "$ref"}

__all__ = ["SchemaError", "load_schema", "validate", "validate_results"]


class SchemaError(KimiJaxError, ValueError):
    """A document that does not match the schema (the message names the first offending field)."""


def load_schema(path: str = SCHEMA_FILE) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_type(value: Any, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or (
            isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if name == "number":
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and (not isinstance(value, float) or math.isfinite(value)))
    if name == "string":
        return isinstance(value, str)
    if name == "array":
        return isinstance(value, (list, tuple))
    if name == "object":
        return isinstance(value, dict)
    raise SchemaError(f"schema: unknown type {name!r}")


def _path(base: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{base}[{key}]"
    return f"{base}.{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key)) else f"{base}[{json.dumps(key)}]"


class _Validator:
    def __init__(self, root: dict):
        self.root = root

    def resolve(self, ref: str) -> dict:
        if not ref.startswith("#/"):
            raise SchemaError(f"schema: only local $ref are supported, got {ref!r}")
        node: Any = self.root
        for part in ref[2:].split("/"):
            if not isinstance(node, dict) or part not in node:
                raise SchemaError(f"schema: $ref {ref!r} does not resolve")
            node = node[part]
        return node

    def errors(self, value: Any, schema: Any, path: str) -> list[str]:
        if schema is True:
            return []
        if schema is False:
            return [f"{path}: not allowed here"]
        if not isinstance(schema, dict):
            raise SchemaError(f"schema at {path}: a schema must be an object or a boolean")
        unknown = set(schema) - _KEYWORDS - _ANNOTATIONS
        if unknown:
            raise SchemaError(f"schema at {path}: unsupported keyword(s) {sorted(unknown)}")
        if "$ref" in schema:
            errs = self.errors(value, self.resolve(schema["$ref"]), path)
            if errs:
                return errs
        if "type" in schema:
            types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            if not any(_is_type(value, t) for t in types):
                shown = _type_name(value)
                if isinstance(value, float) and not math.isfinite(value):
                    shown = f"non-finite number {value}"
                return [f"{path}: expected {' or '.join(types)}, got {shown}"]
        if "const" in schema and value != schema["const"]:
            return [f"{path}: must be {json.dumps(schema['const'])}, got {json.dumps(value)}"]
        if "enum" in schema and value not in schema["enum"]:
            return [f"{path}: must be one of {json.dumps(schema['enum'])}, got {json.dumps(value)}"]
        errs: list[str] = []
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if "minimum" in schema and value < schema["minimum"]:
                errs.append(f"{path}: must be >= {schema['minimum']}, got {value}")
            if "maximum" in schema and value > schema["maximum"]:
                errs.append(f"{path}: must be <= {schema['maximum']}, got {value}")
            if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
                errs.append(f"{path}: must be > {schema['exclusiveMinimum']}, got {value}")
            if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
                errs.append(f"{path}: must be < {schema['exclusiveMaximum']}, got {value}")
        if isinstance(value, str):
            if "minLength" in schema and len(value) < schema["minLength"]:
                errs.append(f"{path}: must have at least {schema['minLength']} characters")
            if "pattern" in schema and re.search(schema["pattern"], value) is None:
                errs.append(f"{path}: {json.dumps(value)[:80]} does not match {schema['pattern']!r}")
        if isinstance(value, (list, tuple)):
            if "minItems" in schema and len(value) < schema["minItems"]:
                errs.append(f"{path}: must have at least {schema['minItems']} items, got {len(value)}")
            if "maxItems" in schema and len(value) > schema["maxItems"]:
                errs.append(f"{path}: must have at most {schema['maxItems']} items, got {len(value)}")
            if "items" in schema:
                for i, item in enumerate(value):
                    errs += self.errors(item, schema["items"], _path(path, i))
        if isinstance(value, dict):
            for key in schema.get("required", []):
                if key not in value:
                    errs.append(f"{_path(path, key)}: required field is missing")
            props = schema.get("properties", {})
            for key, item in value.items():
                if key in props:
                    errs += self.errors(item, props[key], _path(path, key))
                elif "additionalProperties" in schema:
                    extra = schema["additionalProperties"]
                    if extra is False:
                        errs.append(f"{_path(path, key)}: unexpected field")
                    else:
                        errs += self.errors(item, extra, _path(path, key))
        for sub in schema.get("allOf", []):
            errs += self.errors(value, sub, path)
        if "anyOf" in schema:
            branches = [self.errors(value, sub, path) for sub in schema["anyOf"]]
            if all(branches):
                errs.append(_closest(branches, path) if branches else f"{path}: anyOf is empty")
        if "oneOf" in schema:
            branches = [self.errors(value, sub, path) for sub in schema["oneOf"]]
            ok = sum(1 for b in branches if not b)
            if ok == 0:
                errs.append(_closest(branches, path))
            elif ok > 1:
                errs.append(f"{path}: matches {ok} alternatives of oneOf, expected exactly one")
        if "not" in schema and not self.errors(value, schema["not"], path):
            errs.append(f"{path}: must not match {json.dumps(schema['not'])[:120]}")
        if "if" in schema:
            branch = "then" if not self.errors(value, schema["if"], path) else "else"
            if branch in schema:
                errs += self.errors(value, schema[branch], path)
        return errs


def _closest(branches: list[list[str]], path: str) -> str:
    """The most informative first error among failed alternatives: prefer a branch whose type fits (its errors are
    deeper than a type mismatch of the value itself), then the one with the fewest errors."""
    def rank(errs: list[str]):
        return (errs[0].startswith(f"{path}: expected "), len(errs))

    return min(branches, key=rank)[0]


def validate(document: Any, schema: dict) -> list[str]:
    """Every violation of ``schema`` by ``document`` (empty when valid), each naming its field's path."""
    return _Validator(schema).errors(document, schema, "$")


def validate_results(document: Any, schema: dict | None = None) -> None:
    """Raise SchemaError naming the first offending field (and how many more there are) if ``document`` is not a
    valid evaluation result."""
    errs = validate(document, load_schema() if schema is None else schema)
    if errs:
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise SchemaError(errs[0] + more)
