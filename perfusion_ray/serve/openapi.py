"""The FastAPI app behind each deployment: its OpenAPI document names every request body, and the document
and the docs page (/openapi.json, /docs) check the same bearer token as the API.

Routes read their body themselves (http.read_request: one parsing path with its limits), so FastAPI sees no
body parameter; `request_body(model)` puts the pydantic model into the route's OpenAPI entry instead, and the
document carries the models' schemas under components/schemas. A RewardRequestError raised in any route
becomes its JSON refusal (http.refusal_response).
"""

# No `from __future__ import annotations`: FastAPI must see the route annotations (Request) as classes.
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from perfusion_ray.serve.http import authorize, refusal_response
from perfusion_ray.serve.schemas import RewardRequestError

SCHEMAS = "#/components/schemas/"


class Refusal(BaseModel):
    """Every 4xx and 503 answer: a machine-readable kind and a one-line reason."""

    error: str = Field(..., description="what kind of refusal, e.g. invalid_request, body_too_large")
    reason: str = Field(..., description="what is wrong, naming the field or the setting")
    retry_after_s: float | None = Field(None, description="on 429 and 503: seconds to wait (also Retry-After)")


REFUSALS = {status: {"model": Refusal, "description": text} for status, text in (
    (400, "malformed JSON, too deeply nested, or a number too long"), (401, "missing or wrong bearer token"),
    (413, "body too large"), (415, "Content-Type is not application/json"),
    (422, "a field is missing, of the wrong type or out of its limits"), (503, "no replica could answer: retry"))}


def request_body(model: type[BaseModel]) -> dict:
    """openapi_extra for a route whose JSON body is a `model`."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": SCHEMAS + model.__name__}}}}}


def _replica_token() -> str | None:
    from ray import serve

    return serve.get_replica_context().servable_object.token


def ingress_api(title: str, description: str, bodies: Sequence[type[BaseModel]]) -> FastAPI:
    """A FastAPI app for @serve.ingress: `bodies` are the models `request_body` names in its routes."""
    api = FastAPI(title=title, description=description, docs_url=None, redoc_url=None, openapi_url=None)

    def openapi() -> dict:
        if api.openapi_schema is None:
            document = get_openapi(title=api.title, version=api.version, description=api.description,
                                   routes=api.routes)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for model in bodies:
                schema = model.model_json_schema(ref_template=SCHEMAS + "{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            api.openapi_schema = document
        return api.openapi_schema

    api.openapi = openapi

    @api.exception_handler(RewardRequestError)
    async def refused(request: Request, exc: RewardRequestError) -> JSONResponse:
        return refusal_response(exc)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_document(request: Request) -> JSONResponse:
        authorize(request, _replica_token())
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs_page(request: Request):
        authorize(request, _replica_token())
        return get_swagger_ui_html(openapi_url="openapi.json", title=f"{api.title}: API")

    return api
