"""The dashboard of iterations: server-rendered pages over the REST API's service functions.

Pages are Jinja2 templates; live parts poll with htmx (vendored in static/, see its NOTICE);
charts are SVG drawn on the server (charts.py). Sign-in exchanges an API key for a signed
session cookie (sessions.py).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"


def install_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at / and /jobs/..., its assets at /static/dashboard/."""
    from service.dashboard.routes import router

    app.mount("/static/dashboard", StaticFiles(directory=STATIC_DIR), name="dashboard-static")
    app.include_router(router)
