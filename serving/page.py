"""The playground page on the REST port: static files from serving/playground/, nothing else.

`GET /` (and `/playground/`) is the page; its script and style sheet are under `/playground/`.
The page only calls TF Serving's REST API (`GET /v1/models/{name}`, `POST
/v1/models/{name}:predict` with the `sample` signature), as any other client would. These paths
are outside `/v1/`, where tensorflow_model_server answers a 404 HTML page (docs/serving.md).
"""

from __future__ import annotations

import functools
from pathlib import Path

FOLDER = Path(__file__).resolve().parent / "playground"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8"}
ROUTES = {"/": "index.html", "/playground/": "index.html", "/playground/playground.css": "playground.css",
          "/playground/playground.js": "playground.js"}


@functools.lru_cache(maxsize=None)
def _read(name: str) -> bytes:
    return (FOLDER / name).read_bytes()


def asset(path: str) -> tuple[int, bytes, str] | None:
    """(200, body, content type) of the page file served at `path`, or None for any other path."""
    name = ROUTES.get(path)
    if name is None:
        return None
    return 200, _read(name), CONTENT_TYPES[Path(name).suffix]
