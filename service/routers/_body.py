"""Helpers for routes that accept either JSON or a multipart upload on one path."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


async def json_body(request: Request, schema: type[M]) -> M:
    """Parse and validate a JSON body; errors look like any other 422."""
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            "send application/json, or multipart/form-data with a 'file' field",
        )
    raw = await request.body()
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def upload_or_json(json_schema: type[BaseModel], description: str, file_description: str) -> dict[str, Any]:
    """OpenAPI ``requestBody`` documenting both accepted content types.

    The JSON schema carries its own examples (``model_config``); each multipart field is
    described, since a file upload has no useful JSON example.
    """
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary", "description": file_description},
                            "name": {
                                "type": "string",
                                "description": "display name (default: the uploaded file's name)",
                            },
                        },
                    }
                },
                "application/json": {"schema": json_schema.model_json_schema()},
            },
        }
    }
