"""What the OpenAPI schema says that FastAPI cannot see by itself.

``POST /v1/videos`` reads its body by hand (JSON or multipart, as the OpenAI SDK sends it),
so its request body is described here, from :data:`VIDEO_FIELDS`; and every route names the
error statuses it really answers, each in the OpenAI error shape.
"""

from __future__ import annotations

from typing import Any

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_WHY = {
    400: "Bad input; `error.param` names the field",
    401: "No API key, or an unknown or revoked one",
    403: "Not allowed (an operator key is needed, or auth is off and the call is not local)",
    404: "No such object for this tenant",
    409: "Conflicts with the object's state (not ready, idempotency key reused, cancelled)",
    410: "The video expired: its retention is over and its content was deleted",
    413: "Request body too large",
    415: "Content-Type is neither JSON nor a form",
    429: "Queue full or too many wrong keys; see Retry-After",
    500: "Unexpected error (the answer carries the request id)",
    503: "Database or storage unavailable; see Retry-After",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for these statuses."""
    return {
        status: {
            "description": _WHY[status],
            "content": {"application/json": {"schema": ERROR_SCHEMA}},
        }
        for status in statuses
    }


_STRING = {"type": "string"}
_INT = {"type": "integer"}
VIDEO_FIELDS: dict[str, dict[str, Any]] = {
    "model": {**_STRING, "description": "A model of GET /v1/models (optional if one is served)"},
    "prompt": {**_STRING, "minLength": 1, "maxLength": 2000},
    "size": {**_STRING, "pattern": "^[0-9]{1,5}x[0-9]{1,5}$", "example": "832x480"},
    "seconds": {**_STRING, "description": "Duration; rounded to the model's frame rule"},
    "negative_prompt": {**_STRING, "maxLength": 2000},
    "num_frames": {**_INT, "minimum": 1},
    "num_inference_steps": {**_INT, "minimum": 1},
    "guidance_scale": {"type": "number", "minimum": 0, "maximum": 30},
    "seed": {**_INT, "minimum": 0, "maximum": 2**32 - 1},
    "fps": {**_INT, "minimum": 1, "maximum": 120},
    "priority": {**_INT, "minimum": -10, "maximum": 10},
    "metadata": {
        "type": "object",
        "additionalProperties": {**_STRING, "maxLength": 512},
        "maxProperties": 16,
    },
    "batch_id": _STRING,
}


def _body_schema(reference: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": {**VIDEO_FIELDS, "input_reference": reference},
    }


CREATE_VIDEO_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": _body_schema(
                    {**_STRING, "description": "Image-to-video input as a data: URL"}
                )
            },
            "multipart/form-data": {
                "schema": _body_schema(
                    {**_STRING, "format": "binary", "description": "Image-to-video input"}
                )
            },
        },
    }
}
