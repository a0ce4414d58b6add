"""`GET /api/openapi.json`: the OpenAPI 3.1 description of the HTTP API, generated, not written.

Event schemas come from the models (msgspec's JSON Schema of the same structs that validate
requests), replies from the structs the server encodes them with, limits from the settings in
force. The few rules the models cannot express are added here next to the code that enforces
them: `source` is server-set (not accepted from clients), timestamps before 2000 are refused.
"""

from __future__ import annotations

import copy
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Union

import msgspec

from streamapp.model import Event
from streamapp.settings import Settings
from streamapp.web.ingest import EARLIEST_MS
from streamapp.web.wire import ErrorReply, IngestReply, InternalErrorReply

REF = "#/components/schemas/{name}"
_YEAR_2000_ON = r"^([2-9][0-9]{3})-"  # RFC 3339 date-times from 2000 on


def _event_schema(schema: dict[str, Any]) -> dict[str, Any]:
    schema = copy.deepcopy(schema)
    props = schema["properties"]
    del props["source"]
    for option in props["timestamp"]["anyOf"]:
        if option.get("type") == "integer":
            option["minimum"] = EARLIEST_MS
        elif option.get("type") == "string":
            option["pattern"] = _YEAR_2000_ON
    return schema


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(name="ErrorReply")}}},
    }
    if retry_after:
        response["headers"] = {
            "Retry-After": {
                "description": "seconds to wait before retrying",
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            }
        }
    return response


def document(models: dict[str, type[Event]], settings: Settings) -> dict[str, Any]:
    """The OpenAPI document for these event models and limits."""
    union = Union[tuple(models.values())]  # type: ignore[valid-type] # noqa: UP007 - a runtime union
    (event, reply, _, internal), components = msgspec.json.schema_components(
        [union, IngestReply, ErrorReply, InternalErrorReply], ref_template=REF
    )
    for model in models.values():
        name = model.__name__
        components[name] = _event_schema(components[name])
        components[name]["description"] = (model.__doc__ or "").strip() or f"A {model.type_name()!r} event."
    body = {
        "oneOf": [event, {"type": "array", "items": event, "minItems": 1, "maxItems": settings.max_events_per_request}]
    }
    ingest_reply = {"application/json": {"schema": reply}}
    post: dict[str, Any] = {
        "summary": "Send events",
        "description": "One event, an array of events, or NDJSON (one event per line); gzip with "
        f"Content-Encoding: gzip. At most {settings.max_body_bytes} bytes after decompression, "
        f"{settings.max_events_per_request} events, {settings.max_event_bytes} bytes per event. "
        "Events are validated one by one: the valid ones are stored even when others are not.",
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": body},
                "text/plain": {"schema": body},
                "application/x-ndjson": {"schema": {"type": "string", "description": "one JSON event per line"}},
            },
        },
        "responses": {
            "202": {
                "description": "at least one event was accepted (the others are listed in errors)",
                "content": ingest_reply,
            },
            "422": {"description": "no event was accepted; errors says why for each", "content": ingest_reply},
            "400": _error("the body is not JSON/NDJSON, is empty, or is not valid gzip"),
            "401": _error("a write key is required, or the one sent is not valid"),
            "403": _error("the Origin may not send events (STREAMAPP_CORS_ORIGINS)"),
            "408": _error("the body did not arrive within the request timeout"),
            "413": _error("the body, or the number of events, is over the limit"),
            "415": _error("the Content-Type, charset or Content-Encoding is not supported"),
            "429": _error("too many events wait to be written to Iceberg; retry after Retry-After", True),
            "503": _error("the event store (Redis) is unavailable or full; retry after Retry-After", True),
            "500": {
                "description": "the server failed; request_id names its line in the server's error log",
                "content": {"application/json": {"schema": internal}},
            },
        },
    }
    if settings.write_keys:
        post["security"] = [{"writeKeyHeader": []}, {"writeKeyQuery": []}]
    text = {"200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}}
    status = {"description": "status", "content": {"application/json": {"schema": {"type": "object"}}}}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "streamapp",
            "version": _version(),
            "description": "Product-analytics events in, Apache Iceberg tables out.",
        },
        "paths": {
            "/api/events": {"post": post},
            "/healthz": {"get": {"summary": "The process is up", "responses": {"200": status}}},
            "/readyz": {
                "get": {"summary": "Redis answers: events can be taken", "responses": {"200": status, "503": status}}
            },
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": text}},
        },
        "components": {"schemas": components},
    }
    if settings.write_keys:
        doc["components"]["securitySchemes"] = {
            "writeKeyHeader": {"type": "apiKey", "in": "header", "name": "X-Write-Key"},
            "writeKeyQuery": {"type": "apiKey", "in": "query", "name": "writeKey"},
        }
    return doc


def _version() -> str:
    try:
        return version("streamapp")
    except PackageNotFoundError:
        return "0"
