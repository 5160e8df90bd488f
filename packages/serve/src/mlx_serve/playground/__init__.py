"""The playground page ``mlx serve`` shows at ``/``: plain HTML, CSS and JS in ``static/``
(no build step, nothing fetched from elsewhere, so it works offline), talking only to the
server's own OpenAI endpoints and ``/metrics``."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"


def add_playground(app: FastAPI) -> None:
    """Serve the page at ``/`` and its script and style sheet under ``/playground/``."""

    @app.get("/", include_in_schema=False)
    async def playground_page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/playground", StaticFiles(directory=STATIC_DIR), name="playground")


__all__ = ["STATIC_DIR", "add_playground"]
