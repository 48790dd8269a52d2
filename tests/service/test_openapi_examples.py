"""The OpenAPI document at ``/docs`` describes every endpoint with examples.

Every operation has a summary or description; every JSON request body and every 2xx JSON
answer has an example (on the media type, or on the referenced component schema, following
``$ref`` and array ``items``); multipart uploads describe each form field; streams and file
downloads describe their format instead. Every example is checked against its schema with
``jsonschema``, and schema-level examples of the app's pydantic models also with the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel

from service import schemas
from service.app import create_app
from service.routers import dashboard_api
from service.settings import Settings

METHODS = ("get", "post", "put", "patch", "delete")
JSON = "application/json"
# Media types that carry no JSON: their 2xx answer must describe the format in words.
STREAMS = {"text/event-stream", "application/octet-stream"}
DEFAULT_DESCRIPTION = "Successful Response"


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The app's OpenAPI document (building it does no I/O; the settings are a test's)."""
    data = tmp_path_factory.mktemp("openapi")
    settings = Settings(data_dir=data / "data", database_url=f"sqlite:///{data / 'mt.db'}", run_jobs=False)
    return create_app(settings, announce=lambda _msg: None).openapi()


def _operations(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method in METHODS:
            if method in item:
                yield f"{method.upper()} {path}", item[method]


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/components/schemas/"), ref
        schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return schema


def _has_example(spec: dict[str, Any], media: dict[str, Any]) -> bool:
    """An example on the media type, or on its schema (through $ref and array items)."""
    if media.get("example") is not None or media.get("examples"):
        return True
    schema = _resolve(spec, media.get("schema") or {})
    if schema.get("examples") or schema.get("example") is not None:
        return True
    if schema.get("type") == "array" and "items" in schema:
        return _has_example(spec, {"schema": schema["items"]})
    return False


def _validator(spec: dict[str, Any], schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    """A 2020-12 validator for ``schema`` whose ``#/components/...`` refs resolve in ``spec``."""
    root = {**schema, "components": spec.get("components", {})}
    return jsonschema.Draft202012Validator(root)


def _media_examples(media: dict[str, Any]) -> list[Any]:
    found = [media["example"]] if "example" in media else []
    found += [e["value"] for e in (media.get("examples") or {}).values() if "value" in e]
    return found


def test_every_operation_is_summarised(spec: dict[str, Any]) -> None:
    bare = [label for label, op in _operations(spec) if not (op.get("summary") or op.get("description"))]
    assert not bare, f"operations without summary or description: {bare}"


def test_every_request_body_has_an_example(spec: dict[str, Any]) -> None:
    missing = []
    for label, op in _operations(spec):
        content = (op.get("requestBody") or {}).get("content") or {}
        for media_type, media in content.items():
            if media_type == JSON:
                if not _has_example(spec, media):
                    missing.append(f"{label} {media_type}")
            elif media_type == "multipart/form-data":
                fields = _resolve(spec, media.get("schema") or {}).get("properties") or {}
                assert fields, f"{label}: multipart body without fields"
                missing += [
                    f"{label} form field {n!r}" for n, f in fields.items() if not f.get("description")
                ]
            else:
                missing.append(f"{label} {media_type} (undocumented body type)")
    assert not missing, f"request bodies without an example or field descriptions: {missing}"


def test_every_success_answer_has_an_example(spec: dict[str, Any]) -> None:
    missing = []
    for label, op in _operations(spec):
        ok = {code: r for code, r in op["responses"].items() if code.startswith("2")}
        assert ok, f"{label} documents no 2xx answer"
        for code, response in ok.items():
            content = response.get("content") or {}
            assert content, f"{label} {code}: no content documented"
            for media_type, media in content.items():
                if media_type == JSON:
                    if not _has_example(spec, media):
                        missing.append(f"{label} {code} {media_type}")
                elif media_type in STREAMS:
                    text = response.get("description") or ""
                    if text == DEFAULT_DESCRIPTION or len(text) < 40:
                        missing.append(f"{label} {code} {media_type}: describe the stream or file format")
                else:
                    missing.append(f"{label} {code} {media_type} (undocumented answer type)")
    assert not missing, f"2xx answers without an example or format description: {missing}"


def test_media_type_examples_fit_their_schema(spec: dict[str, Any]) -> None:
    checked = 0
    for label, op in _operations(spec):
        bodies = [(op.get("requestBody") or {}).get("content") or {}]
        bodies += [r.get("content") or {} for r in op["responses"].values()]
        for content in bodies:
            for media_type, media in content.items():
                for example in _media_examples(media):
                    if media_type == JSON:
                        _validator(spec, media.get("schema") or {}).validate(example)
                    else:
                        assert isinstance(example, str) and example, f"{label} {media_type}: empty example"
                    checked += 1
    assert checked, "no media-type example at all"


def test_schema_examples_fit_their_schema(spec: dict[str, Any]) -> None:
    """Every component schema's examples, and every inline request-body schema's."""
    found: list[tuple[str, dict[str, Any]]] = list(spec["components"]["schemas"].items())
    for label, op in _operations(spec):
        for media in ((op.get("requestBody") or {}).get("content") or {}).values():
            schema = media.get("schema") or {}
            if "$ref" not in schema and schema.get("examples"):
                found.append((f"{label} body", schema))
    checked = 0
    for name, schema in found:
        for example in schema.get("examples") or []:
            try:
                _validator(spec, schema).validate(example)
            except jsonschema.ValidationError as exc:
                pytest.fail(f"example of {name} does not fit its schema: {exc.message} at {list(exc.path)}")
            checked += 1
    assert checked >= 20, checked


def _pydantic_models() -> dict[str, type[BaseModel]]:
    out: dict[str, type[BaseModel]] = {}
    for module in (schemas, dashboard_api):
        for name, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, BaseModel)
                and value.__module__ == module.__name__
            ):
                out[name] = value
    return out


def test_schema_examples_are_accepted_by_their_models() -> None:
    """The stricter check: the models' own validators (a job's search space, objectives...)."""
    checked = 0
    for name, model in _pydantic_models().items():
        for example in model.model_json_schema().get("examples") or []:
            model.model_validate(example)
            checked += 1
        if name.endswith("Public") or name.endswith("Create"):
            assert model.model_json_schema().get("examples"), f"{name} has no examples"
    assert checked >= 20, checked


def test_stream_and_file_answers_are_not_documented_as_json(spec: dict[str, Any]) -> None:
    for path in ("/v1/jobs/{job_id}/events", "/v1/artifacts/{artifact_id}/download"):
        content = spec["paths"][path]["get"]["responses"]["200"]["content"]
        assert JSON not in content, f"{path} documents a JSON answer it never gives"
    blob = spec["paths"]["/v1/devices/{device_id}/blobs/{sha256}"]["get"]["responses"]["200"]["content"]
    assert set(blob) == {"application/octet-stream"}


def test_docs_page_is_served(tmp_path: Path) -> None:
    """``/docs`` and ``/openapi.json`` need no lifespan: the page is static, the spec is built lazily."""
    from fastapi.testclient import TestClient

    settings = Settings(
        data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'mt.db'}", run_jobs=False
    )
    client = TestClient(create_app(settings, announce=lambda _msg: None))
    assert client.get("/docs").status_code == 200
    served = client.get("/openapi.json").json()
    assert served["paths"]["/v1/jobs"]["post"]["requestBody"]["content"][JSON]["schema"]["$ref"]
    # FastAPI drops None from the document (fastapi#5559); the app puts examples' nulls back.
    artifact = served["components"]["schemas"]["ArtifactPublic"]["examples"][0]
    assert "error" in artifact and artifact["error"] is None
