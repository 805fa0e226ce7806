"""The interactive API docs (Swagger UI and ReDoc), with their scripts and styles served here.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so offline (an air-gapped cluster, a
laptop on a train) they stay blank. The files come from the fastapi-offline package, which ships
Swagger UI 5 and ReDoc 2 as package data; this process serves them under ASSETS_URL and the
pages point there. Nothing on these pages is fetched from another origin.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/api/v1/docs"
REDOC_URL = "/api/v1/redoc"
OAUTH2_REDIRECT_URL = "/api/v1/docs/oauth2-redirect"
ASSETS_URL = "/api/v1/docs/assets"
ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))
# The pages' own policy: everything from this origin; the inline script that starts Swagger
# UI (and its inline styles), data: images (its icons), blob: workers (ReDoc's search).
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; frame-ancestors 'none'"
)


def install_docs(app: FastAPI) -> frozenset[str]:
    """Add the docs pages and their assets to `app` (created with docs_url=redoc_url=None);
    returns the pages' paths."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    def asset(request: Request, name: str) -> str:
        return f"{request.scope.get('root_path', '')}{ASSETS_URL}/{name}"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
            swagger_js_url=asset(request, "swagger-ui-bundle.js"),
            swagger_css_url=asset(request, "swagger-ui.css"),
            swagger_favicon_url=asset(request, "favicon.png"),
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=asset(request, "redoc.standalone.js"),
            redoc_favicon_url=asset(request, "favicon.png"),
            with_google_fonts=False,
        )

    return frozenset({DOCS_URL, REDOC_URL, OAUTH2_REDIRECT_URL})
