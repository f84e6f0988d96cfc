"""OpenAI's ``response_format``: the request body's shapes and the engine's ``JsonFormat``.

``{"type": "text"}`` (the default) leaves the output free; ``{"type": "json_object"}`` asks
for any JSON object; ``{"type": "json_schema", "json_schema": {"name", "schema",
"strict"?, "description"?}}`` for JSON valid against the schema. The output always follows
the schema exactly, ``strict`` or not: a schema the grammar engine cannot enforce is
refused (400, ``param`` "response_format") rather than followed loosely.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from loratree.serve.constrain import JsonFormat

__all__ = ["JsonObjectFormat", "JsonSchemaFormat", "JsonSchemaSpec", "ResponseFormat",
           "TextFormat", "to_constraint"]


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: Annotated[str, Field(max_length=10_000)] | None = None
    json_schema: dict[str, Any] | StrictBool = Field(alias="schema")
    """The JSON schema (``schema`` in the body)."""
    strict: StrictBool | None = None
    """Accepted; the output follows the schema exactly either way."""


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat,
                           Field(discriminator="type")]


def to_constraint(fmt: TextFormat | JsonObjectFormat | JsonSchemaFormat | None
                  ) -> JsonFormat | None:
    """The engine's constraint for a request's ``response_format`` (None: free text)."""
    if isinstance(fmt, JsonObjectFormat):
        return JsonFormat()
    if isinstance(fmt, JsonSchemaFormat):
        return JsonFormat.of_schema(fmt.json_schema.json_schema)
    return None
