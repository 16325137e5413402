"""``tagfer serve``: a local web page and JSON API for grounded explanations.

Routes
    ``GET /``            the single page (``tagfer/explainer/web/index.html`` + ``app.js`` + ``style.css``):
                         upload or drop an image, see each face's overlay, its trace with every
                         ``<bbox>`` highlighted in the colour of its box, the label and the scores.
    ``GET /static/...``  the page's assets.
    ``GET /health``      ``{"ok": true, "max_upload_mb": 10.0}``.
    ``GET /openapi.json`` the API schema (no ``/docs`` page: Swagger UI would load from a CDN).
    ``POST /analyze``    multipart form with one ``file`` field → the JSON of
                         :class:`tagfer.explainer.analyze.ImageResult` (as ``tagfer analyze --json``), with
                         ``overlays`` holding one ``data:image/png;base64,…`` URL per face
                         (``?overlay=false`` leaves them out).

Errors (JSON ``{"error": {"kind": ..., "message": ...}}``)
    413 ``too_large`` (upload above ``max_upload_mb``, or an image whose header is above the
        decode budget of :mod:`tagfer.core.imageio`: answered from the header, nothing is decoded);
    415 ``not_an_image`` (not a decodable image) or ``unsupported_media_type`` (not multipart);
    422 ``no_face``, ``corrupt``, ``empty_file``, ``too_small``, ``missing_file``;
    500 ``internal``.

Trusted hosts: only requests whose ``Host`` header is in ``allowed_hosts`` (default localhost,
127.0.0.1, [::1]; see :mod:`tagfer.core.trusted_hosts`) are served, others get 400, so a
DNS-rebinding page cannot drive the server from the user's browser.

Concurrency: MediaPipe's landmarker is not thread-safe, so the app keeps a pool of
``pool_size`` analyzers (each with its own detector; built lazily, reused). Requests
run in the threadpool (the event loop stays responsive) and borrow one analyzer each.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response

from tagfer.core.errors import ItemError
from tagfer.core.imageio import probe
from tagfer.core.trusted_hosts import add_host_check
from tagfer.explainer.analyze import Analyzer, AnalyzerPool, ImageResult, load_engine, png_data_url

STATUS = {
    "too_large": 413,
    "not_an_image": 415,
    "unsupported_media_type": 415,
    "no_face": 422,
    "corrupt": 422,
    "empty_file": 422,
    "too_small": 422,
    "missing_file": 422,
    "not_found": 422,
    "unreadable": 422,
    "internal": 500,
}


@dataclass(frozen=True)
class ServeConfig:
    """How the server builds its analyzers: ``model`` (None = facs engine), ``pool_size``
    analyzers in parallel, ``frame`` as in :class:`tagfer.explainer.analyze.Analyzer`."""

    model: str | None = None
    pool_size: int = 2
    frame: str = "face"
    max_faces: int = 5


def _factory(config: ServeConfig) -> Callable[[], Analyzer]:
    engine: Any = "facs"
    if config.model is not None:
        engine = load_engine(config.model)  # one model shared by every analyzer (generation is locked)

    def make() -> Analyzer:
        return Analyzer(engine=engine, frame=config.frame, max_faces=config.max_faces)

    return make


def _asset(name: str) -> bytes:
    return (resources.files("tagfer.explainer") / "web" / name).read_bytes()


_ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def create_app(
    analyzer_factory: Callable[[], Analyzer] | ServeConfig | None = None,
    max_upload_mb: float = 10.0,
    pool_size: int | None = None,
    *,
    allowed_hosts: Sequence[str] | None = None,
):
    """The FastAPI app. ``analyzer_factory``: a zero-argument callable building an
    :class:`Analyzer`, or a :class:`ServeConfig` (default: the facs engine). ``allowed_hosts``:
    the Host header values served (default :data:`tagfer.core.trusted_hosts.LOCAL_HOSTS`)."""
    if analyzer_factory is None or isinstance(analyzer_factory, ServeConfig):
        cfg = analyzer_factory or ServeConfig()
        factory = _factory(cfg)
        size = pool_size or cfg.pool_size
    else:
        factory = analyzer_factory
        size = pool_size or 2
    pool = AnalyzerPool(factory, size)
    limit = int(max_upload_mb * 1024 * 1024)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        pool.close()  # release the detectors when the server stops

    app = FastAPI(title="tagfer", docs_url=None, redoc_url=None, lifespan=lifespan)  # /docs needs a CDN
    add_host_check(app, allowed_hosts)
    app.state.pool = pool
    app.state.max_upload_bytes = limit

    def error(kind: str, message: str) -> JSONResponse:
        return JSONResponse({"error": {"kind": kind, "message": message}}, status_code=STATUS.get(kind, 422))

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(_asset("index.html").decode("utf-8"))

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in _ASSETS:
            return JSONResponse({"error": {"kind": "not_found", "message": f"no asset {name!r}"}}, status_code=404)
        return Response(_asset(name), media_type=_ASSETS[name])

    @app.get("/health")
    def health() -> dict:
        return {"ok": True, "max_upload_mb": max_upload_mb}

    @app.post("/analyze")
    async def analyze(request: Request, overlay: bool = True) -> Response:
        mb = f"{max_upload_mb:g} MB"
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit + 64 * 1024:
            return error("too_large", f"upload of {int(declared):,} bytes is above the {mb} limit")
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return error("unsupported_media_type", "send the image as multipart/form-data with a 'file' field")
        # Read the body ourselves so that an undeclared or chunked upload cannot exceed the limit.
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit + 64 * 1024:
                return error("too_large", f"upload is above the {mb} limit")
        try:
            form = await _parse_form(request, bytes(body))
        except Exception as e:
            return error("missing_file", f"could not read the multipart form: {e}")
        upload = form.get("file")
        if upload is None or not hasattr(upload, "read"):
            return error("missing_file", "no 'file' field in the form")
        data = await upload.read()
        name = getattr(upload, "filename", None) or "upload"
        if len(data) > limit:
            return error("too_large", f"file of {len(data):,} bytes is above the {mb} limit")
        if not data:
            return error("empty_file", "the uploaded file is empty")
        try:  # header checks (decode budget, format, size) in milliseconds, before any decoding
            probe(data)
        except ItemError as e:
            return error(e.kind, e.message)

        def work(a: Analyzer) -> dict:
            res: ImageResult = a.run(data, name=name)
            out = res.to_json()
            if res.ok and overlay:
                out["overlays"] = [png_data_url(im) for im in res.render_overlays()]
            return out

        out = await run_in_threadpool(pool.run, work)
        if out["error"]:
            resp = error(out["error"]["kind"], out["error"]["message"])
            return resp
        return JSONResponse(out)

    return app


async def _parse_form(request, body: bytes):
    """Parse a multipart body already read into memory (starlette's parser on a replayed stream)."""
    from starlette.requests import Request

    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    replay = Request(request.scope, receive)
    return await replay.form(max_files=1, max_fields=16)
