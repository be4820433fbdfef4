"""The official Cloud Hypervisor API spec (v53.0) as validators of request bodies.

`cloud-hypervisor-v53.0.yaml` beside this file is
vmm/src/api/openapi/cloud-hypervisor.yaml of Cloud Hypervisor's v53.0 tag, unchanged.
Bodies are checked by openapi-schema-validator (OpenAPI 3.0 semantics, formats
included); the integer formats the spec uses beyond OpenAPI's own (int8, int16,
uint8, uint16, uint32) are range-checked too.

Strict by default: an object may carry only the properties its schema lists. The
spec itself allows more and CH ignores unknown fields, which is exactly how a
misspelt field would go unnoticed; the stand-in and the unit tests refuse them.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonschema import FormatChecker
from jsonschema.exceptions import ValidationError
from openapi_schema_validator import OAS30Validator, oas30_format_checker

SPEC_PATH = Path(__file__).with_name("cloud-hypervisor-v53.0.yaml")
SPEC_VERSION = "v53.0"

_INT_RANGES = {
    "int8": (-(1 << 7), (1 << 7) - 1),
    "int16": (-(1 << 15), (1 << 15) - 1),
    "uint8": (0, (1 << 8) - 1),
    "uint16": (0, (1 << 16) - 1),
    "uint32": (0, (1 << 32) - 1),
}


@functools.cache
def spec() -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(SPEC_PATH) as f:
        loaded: dict[str, Any] = yaml.load(f, Loader=loader)  # a safe loader
    return loaded


def _format_checker() -> FormatChecker:
    checker = copy.deepcopy(oas30_format_checker)
    for name, (low, high) in _INT_RANGES.items():

        def in_range(value: object, low: int = low, high: int = high) -> bool:
            return not isinstance(value, int) or isinstance(value, bool) or low <= value <= high

        checker.checks(name)(in_range)
    return checker


def _strict(node: Any) -> Any:
    """A copy of a schema in which objects allow only the properties they list."""
    if isinstance(node, dict):
        out = {key: _strict(value) for key, value in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(item) for item in node]
    return node


@functools.cache
def _components(strict: bool) -> dict[str, Any]:
    components = spec()["components"]
    return _strict(components) if strict else components


@functools.cache
def validator(schema_name: str, *, strict: bool = True) -> OAS30Validator:
    """A validator of `#/components/schemas/<schema_name>`."""
    components = _components(strict)
    if schema_name not in components["schemas"]:
        raise KeyError(f"no schema {schema_name!r} in the spec")
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": components}
    return OAS30Validator(root, format_checker=_format_checker())


def errors(schema_name: str, body: object, *, strict: bool = True) -> list[str]:
    """Every way `body` breaks the schema, as `path: message` lines (empty: valid)."""
    found: Iterator[ValidationError] = validator(schema_name, strict=strict).iter_errors(body)
    return sorted(
        f"{'/'.join(str(p) for p in error.absolute_path) or '(body)'}: {error.message}"
        for error in found
    )


def request_schema(endpoint: str) -> str | None:
    """The schema name of PUT /<endpoint>'s request body, or None if it takes none."""
    operation = spec()["paths"].get(f"/{endpoint}", {}).get("put", {})
    content = operation.get("requestBody", {}).get("content", {})
    ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
    return ref.rsplit("/", 1)[-1] or None


def endpoints() -> dict[str, set[str]]:
    """Endpoint name -> the HTTP methods the spec gives it (upper case)."""
    return {
        path.lstrip("/"): {method.upper() for method in item}
        for path, item in spec()["paths"].items()
    }
