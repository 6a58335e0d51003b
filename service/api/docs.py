"""The API's documents: /openapi.json (with the models routes refer to themselves) and the
Swagger UI and ReDoc pages, their assets served from the package rather than a CDN.

Why not FastAPI's defaults: its pages load Swagger UI and ReDoc from cdn.jsdelivr.net (and
ReDoc's fonts from Google), so they are blank on a machine without internet. This is FastAPI's
documented self-hosting recipe (docs_url=None, our own routes with local asset URLs); the
assets come from the `fastapi-standalone-docs` package on PyPI, which bundles both (we use its
files, not its global patch of FastAPI's page functions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi_standalone_docs
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.api.routing import component_schemas

ASSETS_DIR = Path(fastapi_standalone_docs.__file__).parent / "static"
ASSETS_URL = "/static/docs"


def install_openapi(app: FastAPI) -> None:
    """`app.openapi()` with the component schemas that `routing.component_ref` handed out."""

    generate = app.openapi  # FastAPI's, which caches the document in app.openapi_schema

    def openapi() -> dict[str, Any]:
        document = generate()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for name, schema in component_schemas().items():
            schemas.setdefault(name, schema)
        return document

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override


def install_docs(app: FastAPI) -> None:
    """Serve /docs (Swagger UI) and /redoc (ReDoc) with their assets under /static/docs/."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-static")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} — API",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/fastapi/favicon.png",
            oauth2_redirect_url=None,
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} — API",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/fastapi/favicon.png",
            with_google_fonts=False,
        )
