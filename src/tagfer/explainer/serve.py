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
                         (``?overlay=false`` leaves them out). A video clip (recognised by its
                         first bytes, else its extension) becomes a background job
                         (:mod:`tagfer.explainer.video_jobs`): 200 with the finished job's JSON when
                         it is done within ``?wait=`` seconds (default 5), else 202 with its
                         ``status_url`` (also the ``Location`` header).
    ``GET /jobs/{id}``   a video job: state, progress, and once done the summary, the segments
                         (each with its apex trace cut at its boxes) and the URLs of
                         ``records.jsonl`` (the records of ``tagfer analyze CLIP --out``),
                         ``segments.jsonl``, ``result.json`` (all of it in one document) and ``clip``.
    ``POST /live``       open a live session (:mod:`tagfer.explainer.live`): ``{session, token, …}``;
                         503 ``live_full`` when ``LiveConfig.max_sessions`` are open.
    ``POST /live/{id}/frame``   one camera frame (the body: JPEG/PNG/WebP bytes, header
                         ``X-Live-Token``) → the faces' boxes, AU boxes and smoothed label (JSON).
    ``POST /live/{id}/explain`` one frame (same body) → the photo view's JSON (full grounded trace).
    ``POST /live/{id}/close``   end the session. Live frames are analysed in memory, never stored.

Errors (JSON ``{"error": {"kind": ..., "message": ...}}``)
    403 ``cross_origin`` (a state-changing request sent by a page of another origin: see below);
    408 ``body_timeout`` (the upload stalled: no data for ``body_timeout_s`` seconds, or not
        complete after ``body_deadline_s``; the connection is closed);
    413 ``too_large`` (upload above ``max_upload_mb``, or an image whose header is above the
        decode budget of :mod:`tagfer.core.imageio`: answered from the header, nothing is decoded);
    415 ``not_an_image`` (not a decodable image) or ``unsupported_media_type`` (not multipart);
    422 ``no_face``, ``corrupt``, ``empty_file``, ``too_small``, ``missing_file``;
    503 ``busy`` (``max_pending`` uploads are already in flight, or ``max_queued`` clips; with ``Retry-After``);
    500 ``internal``. Video: 413 ``too_long`` (a clip above ``max_duration_s``), 415 ``not_a_video``,
    422 ``zero_length``; 404 ``job_not_found``. Live: 503 ``live_full``, 404 ``session_not_found``
    (closed or timed out), 403 ``bad_token``, 429 ``too_fast`` / ``frame_in_flight`` (the page drops
    that frame), and the image kinds above for a bad frame.

Trusted hosts and origins: only requests whose ``Host`` header is in ``allowed_hosts`` (default
localhost, 127.0.0.1, [::1]; see :mod:`tagfer.core.trusted_hosts`) are served, others get 400, so a
DNS-rebinding page cannot drive the server from the user's browser. ``POST`` requests are also
refused (403) when their ``Origin`` is neither the server's own nor in ``allowed_origins``
(``Origin: null`` included), or, without an ``Origin``, when ``Sec-Fetch-Site`` is not
``same-origin``/``none``: any web page the user visits could otherwise make the browser post to it.
Clients that are not browsers send neither header and are served.

Load: at most ``max_pending`` uploads are in flight at once (being received, checked, waiting
for an analyzer or analysed); one more is answered 503 at once, before its body is read. An
upload is streamed to a temporary file (at most ``SPOOL_BYTES`` of it in memory), the analyzer
reads it from there, so a queued upload holds almost no memory. Everything that parses the
upload (the multipart form, the header checks of :func:`tagfer.core.imageio.probe`, decoding)
runs in worker threads: the event loop only moves bytes, so ``/health`` and the page answer
while uploads are checked.

Connections: ``tagfer serve`` runs the app under :class:`tagfer.core.serving.ServerLimits`
(connections at once, a deadline and a size limit for request headers, keep-alive). No answer
names a server path: messages and records say the upload's own (sanitised) file name.

Concurrency: MediaPipe's landmarker is not thread-safe, so the app keeps a pool of
``pool_size`` analyzers (each with its own detector; built lazily, reused). Requests
borrow one analyzer each.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from importlib import resources
from typing import IO, Any, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse

from tagfer.core.errors import ItemError
from tagfer.core.imageio import probe
from tagfer.core.trusted_hosts import add_host_check, add_origin_check
from tagfer.explainer.analyze import Analyzer, AnalyzerPool, ImageResult, load_engine, png_data_url
from tagfer.explainer.live import LiveConfig, LiveError, LiveSessions
from tagfer.explainer.video_jobs import VideoJobs, looks_like_video, public_paths, upload_name

STATUS = {
    "cross_origin": 403,
    "bad_token": 403,
    "job_not_found": 404,
    "session_not_found": 404,
    "body_timeout": 408,
    "too_large": 413,
    "not_an_image": 415,
    "unsupported_media_type": 415,
    "not_a_video": 415,
    "too_long": 413,
    "zero_length": 422,
    "too_fast": 429,
    "frame_in_flight": 429,
    "no_face": 422,
    "corrupt": 422,
    "empty_file": 422,
    "too_small": 422,
    "missing_file": 422,
    "not_found": 422,
    "unreadable": 422,
    "internal": 500,
    "busy": 503,
    "live_full": 503,
}
SPOOL_BYTES = 1 << 20  # an upload keeps at most this much in memory; the rest goes to a temporary file
MAX_FORM_PARTS = 16
#: any path under the temporary folder (where uploads are spooled), as it may appear in a message
_TEMP_PATH = re.compile(re.escape(tempfile.gettempdir().rstrip("/\\")) + r"[/\\][^\s'\"(),;:]*")


def public_message(message: str, paths: dict[str, str] | None = None) -> str:
    """An error message as the client gets it: each server path in ``paths`` replaced by what the
    client may see (:func:`tagfer.explainer.video_jobs.public_paths`), then any other path in the
    temporary folder by ``the upload``."""
    return _TEMP_PATH.sub("the upload", public_paths(message, paths or {}))


@dataclass(frozen=True)
class ServeConfig:
    """How the server builds its analyzers: ``model`` (None = facs engine), ``pool_size``
    analyzers in parallel, ``frame`` as in :class:`tagfer.explainer.analyze.Analyzer`."""

    model: str | None = None
    pool_size: int = 2
    frame: str = "face"
    max_faces: int = 5


#: the page's icon: a face with one box on it (an AU region), in the page's colours
FAVICON_SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><circle cx="16" cy="16" r="14" fill="#f5d7b5" '
               b'stroke="#444" stroke-width="2"/><rect x="8" y="18" width="16" height="7" fill="none" stroke="#e61e1e" '
               b'stroke-width="2"/><circle cx="11" cy="12" r="2" fill="#444"/><circle cx="21" cy="12" r="2" fill="#444"/></svg>')


def _factory(config: ServeConfig) -> Callable[[], Analyzer]:
    engine: Any = "facs"
    if config.model is not None:
        engine = load_engine(config.model)  # one model shared by every analyzer (generation is locked)

    def make() -> Analyzer:
        return Analyzer(engine=engine, frame=config.frame, max_faces=config.max_faces)

    return make


def _asset(name: str) -> bytes:
    return (resources.files("tagfer.explainer") / "web" / name).read_bytes()


_JS = "text/javascript; charset=utf-8"
_ASSETS = {"app.js": _JS, "grounded.js": _JS, "video.js": _JS, "live.js": _JS, "style.css": "text/css; charset=utf-8"}


def create_app(
    analyzer_factory: Callable[[], Analyzer] | ServeConfig | None = None,
    max_upload_mb: float = 10.0,
    pool_size: int | None = None,
    *,
    allowed_hosts: Sequence[str] | None = None,
    allowed_origins: Sequence[str] = (),
    max_pending: int | None = None,
    check_workers: int = 1,
    body_timeout_s: float = 15.0,
    body_deadline_s: float = 300.0,
    live: LiveConfig | LiveSessions | None = None,
    videos: VideoJobs | None = None,
):
    """The FastAPI app. ``analyzer_factory``: a zero-argument callable building an
    :class:`Analyzer`, or a :class:`ServeConfig` (default: the facs engine). ``allowed_hosts``:
    the Host header values served (default :data:`tagfer.core.trusted_hosts.LOCAL_HOSTS`);
    ``allowed_origins``: other origins (``http://host:port``) whose pages may post uploads.
    ``max_pending``: uploads in flight at once (default 4 per analyzer), more get 503;
    ``check_workers``: uploads parsed and header-checked at once (these steps run Python code,
    which holds the GIL: more threads would not check faster, only slow the event loop down);
    ``body_timeout_s``: longest wait for the next piece of an upload, ``body_deadline_s``: longest
    time to receive a whole one (408 and the connection closed after either). ``live``: the live
    sessions' limits (:class:`tagfer.explainer.live.LiveConfig`, or ready :class:`LiveSessions`);
    ``videos``: the video job runner (default :class:`tagfer.explainer.video_jobs.VideoJobs()`)."""
    if analyzer_factory is None or isinstance(analyzer_factory, ServeConfig):
        cfg = analyzer_factory or ServeConfig()
        factory = _factory(cfg)
        size = pool_size or cfg.pool_size
    else:
        factory = analyzer_factory
        size = pool_size or 2
    pending_cap = max_pending if max_pending is not None else 4 * size
    if pending_cap < 1 or check_workers < 1:
        raise ValueError("max_pending and check_workers must be >= 1")
    checking = threading.BoundedSemaphore(check_workers)
    if not (body_timeout_s > 0 and body_deadline_s > 0):  # also refuses NaN
        raise ValueError("body_timeout_s and body_deadline_s must be positive")
    pool = AnalyzerPool(factory, size)
    limit = int(max_upload_mb * 1024 * 1024)
    assets = {name: _asset(name) for name in ("index.html", *_ASSETS)}  # read once: no disk I/O per request

    sessions = live if isinstance(live, LiveSessions) else LiveSessions(live or LiveConfig())
    jobs = videos if videos is not None else VideoJobs()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        pool.close()  # release the detectors when the server stops
        sessions.close_all()
        jobs.close()  # deletes every uploaded clip and its records

    app = FastAPI(title="tagfer", docs_url=None, redoc_url=None, lifespan=lifespan)  # /docs needs a CDN
    add_origin_check(app, allowed_origins)
    add_host_check(app, allowed_hosts)  # added last: runs first
    app.state.pool = pool
    app.state.max_upload_bytes = limit
    app.state.max_pending = pending_cap
    app.state.pending = 0  # uploads in flight (only touched on the event loop)
    app.state.live = sessions
    app.state.videos = jobs

    def error(kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        """Every error answer: its message never names a server path."""
        return JSONResponse({"error": {"kind": kind, "message": public_message(message)}}, status_code=STATUS.get(kind, 422),
                            headers=headers)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(assets["index.html"].decode("utf-8"))

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in _ASSETS:
            return JSONResponse({"error": {"kind": "not_found", "message": f"no asset {name!r}"}}, status_code=404)
        return Response(assets[name], media_type=_ASSETS[name])

    @app.get("/favicon.ico")
    async def favicon() -> Response:  # browsers ask for it on every page load: an icon, not a 404 in the log
        return Response(FAVICON_SVG, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @app.get("/health")
    async def health() -> dict:  # async: answered on the event loop, never queued behind worker threads
        return {"ok": True, "max_upload_mb": max_upload_mb}

    @app.post("/analyze")
    async def analyze(request: Request, overlay: bool = True, wait: float = 5.0) -> Response:
        mb = f"{max_upload_mb:g} MB"
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit + 64 * 1024:
            return error("too_large", f"upload of {int(declared):,} bytes is above the {mb} limit",
                         headers={"Connection": "close"})
        if app.state.pending >= pending_cap:  # nothing awaited between the test and the increment
            # a declared body within the limit is drained by the server (the client reads the 503); others are cut
            close = {} if declared is not None and declared.isdigit() else {"Connection": "close"}
            return error("busy", f"{pending_cap} uploads are already being analysed; try again shortly",
                         headers={"Retry-After": "2", **close})
        app.state.pending += 1
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        try:
            ctype = request.headers.get("content-type", "")
            if not ctype.startswith("multipart/form-data"):
                return error("unsupported_media_type", "send the image as multipart/form-data with a 'file' field")
            failed = await _receive_body(request, spool, limit + 64 * 1024, body_timeout_s, body_deadline_s)
            if failed is not None:
                return error(*failed, headers={"Connection": "close"})  # the rest of the body is never read

            def work() -> dict:  # in a worker thread: parsing, checks, decoding and analysis
                with tempfile.TemporaryDirectory(prefix="tagfer-upload-") as d:
                    path = os.path.join(d, "upload")
                    with checking:
                        failed = _check_upload(spool, ctype, path, limit, mb, jobs)
                    if isinstance(failed, dict):
                        return failed
                    name = failed
                    if isinstance(name, tuple):  # a video clip: header checked, handed to the job runner
                        try:
                            job = jobs.submit(path, name[1], *name[2])
                        except ItemError as e:
                            return {"error": {"kind": e.kind, "message": e.message}}
                        return {"error": None, "job": job}

                    def analyse(a: Analyzer) -> dict:
                        res: ImageResult = a.run(path, name=name or "upload")
                        # the analyzer read the upload from `path`: its messages say so, the client sees the upload's name
                        out = public_paths(res.to_json(), {path: name or "upload", d: ""})
                        if res.ok and overlay:
                            out["overlays"] = [png_data_url(im) for im in res.render_overlays()]
                        return out

                    return pool.run(analyse)

            out = await run_in_threadpool(work)
            if out["error"]:
                headers = {"Retry-After": "10"} if out["error"]["kind"] == "busy" else None
                return error(out["error"]["kind"], out["error"]["message"], headers=headers)
            if "job" in out:
                job = out["job"]
                if wait > 0:
                    await run_in_threadpool(job.done.wait, min(wait, 30.0))  # NaN/negative: no wait
                st = job.status()
                if job.done.is_set():
                    return JSONResponse(st)
                return JSONResponse(st, status_code=202, headers={"Location": st["status_url"]})
            return JSONResponse(out)
        finally:
            spool.close()
            app.state.pending -= 1

    # ------------------------------------------------------------------ video jobs
    def job_or_404(jid: str):
        job = jobs.get(jid)
        if job is None:
            return None, error("job_not_found", "no such video job (finished jobs are kept for a while, then deleted)")
        return job, None

    @app.get("/jobs/{jid}")
    async def job_status(jid: str) -> Response:
        job, err = job_or_404(jid)
        if err is not None:
            return err
        return JSONResponse(await run_in_threadpool(job.status))  # reads the segments file when done

    @app.get("/jobs/{jid}/{what}")
    async def job_file(jid: str, what: str) -> Response:
        job, err = job_or_404(jid)
        if err is not None:
            return err
        if what == "clip":
            return FileResponse(job.clip, filename=job.name, content_disposition_type="inline")  # Range requests: seeking
        if not job.done.is_set() or what not in ("records.jsonl", "segments.jsonl", "result.json"):
            return JSONResponse({"error": {"kind": "not_found", "message": f"no {what!r} for this job (yet)"}}, status_code=404)
        stem = os.path.splitext(job.name)[0] or "clip"
        if what == "result.json":
            return StreamingResponse(job.iter_result(), media_type="application/json",
                                     headers={"Content-Disposition": f'attachment; filename="{_safe(stem)}.json"'})
        path = job.records if what == "records.jsonl" else job.segments_file
        if not path.exists():
            path.touch()
        return FileResponse(path, media_type="application/x-ndjson", filename=f"{_safe(stem)}.{what}")

    # ------------------------------------------------------------------ live camera
    def live_error(e: ItemError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.kind in ("too_fast", "frame_in_flight") else (
            {"Retry-After": str(int(sessions.config.idle_timeout_s))} if e.kind == "live_full" else None)
        return error(e.kind, e.message, headers=headers)

    @app.post("/live")
    async def live_open() -> Response:
        try:
            s = await run_in_threadpool(sessions.open)  # loads a landmarker: not on the event loop
        except ItemError as e:
            return live_error(e)
        base = f"/live/{s.id}"
        from tagfer.au.video_render import LABEL_COLORS

        return JSONResponse({"session": s.id, "token": s.token, "frame_url": f"{base}/frame", "explain_url": f"{base}/explain",
                             "close_url": f"{base}/close", "max_fps": sessions.config.max_fps,
                             "idle_timeout_s": sessions.config.idle_timeout_s, "max_frame_bytes": sessions.config.max_frame_bytes,
                             "label_colors": LABEL_COLORS,
                             "note": "Frames are analysed in memory and never stored."}, status_code=201)

    async def live_body(request: Request) -> bytes | JSONResponse:
        cap = sessions.config.max_frame_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            return error("too_large", f"frame of {int(declared):,} bytes is above the {cap:,}-byte limit", headers={"Connection": "close"})
        buf = io.BytesIO()  # in memory only: a live frame is never written anywhere
        failed = await _receive_body(request, buf, cap, body_timeout_s, min(body_deadline_s, 30.0))
        if failed is not None:
            return error(*failed, headers={"Connection": "close"})
        return buf.getvalue()

    @app.post("/live/{sid}/frame")
    async def live_frame(sid: str, request: Request) -> Response:
        token = request.headers.get("x-live-token")
        try:
            sessions.get(sid, token)  # refuse an unknown session or a wrong token before reading the body
        except ItemError as e:
            return live_error(e)
        data = await live_body(request)
        if isinstance(data, Response):
            return data
        try:
            return JSONResponse(await run_in_threadpool(sessions.frame, sid, token, data))
        except ItemError as e:
            return live_error(e)
        except MemoryError:
            return error("internal", "out of memory while analysing this frame")

    @app.post("/live/{sid}/explain")
    async def live_explain(sid: str, request: Request, overlay: bool = True) -> Response:
        try:
            s = sessions.get(sid, request.headers.get("x-live-token"))
        except ItemError as e:
            return live_error(e)
        data = await live_body(request)
        if isinstance(data, Response):
            return data
        if not s.busy.acquire(blocking=False):  # one request of a session at a time, frames and explanations alike
            return live_error(LiveError("frame_in_flight", "this session's previous frame is still being analysed"))

        def analyse(a: Analyzer) -> dict:
            res: ImageResult = a.run(data, name="live frame")  # decoded from memory
            out = res.to_json()
            if res.ok and overlay:
                out["overlays"] = [png_data_url(im) for im in res.render_overlays()]
            return out

        try:
            out = await run_in_threadpool(pool.run, analyse)
        finally:
            s.busy.release()
        if out["error"]:
            return error(out["error"]["kind"], out["error"]["message"])
        return JSONResponse(out)

    @app.post("/live/{sid}/close")
    async def live_close(sid: str, request: Request) -> Response:
        try:
            sessions.get(sid, request.headers.get("x-live-token") or request.query_params.get("token"))
        except LiveError as e:
            if e.kind == "session_not_found":
                return JSONResponse({"closed": False})
            return live_error(e)
        return JSONResponse({"closed": await run_in_threadpool(sessions.close, sid)})

    return app


def _safe(stem: str) -> str:
    """A file name safe in a Content-Disposition header."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80] or "clip"


def _check_upload(spool: IO[bytes], ctype: str, path: str, limit: int, mb: str,
                  jobs: VideoJobs | None = None) -> str | tuple | dict:
    """Parse the multipart body in ``spool`` into the file ``path`` and run the header checks:
    the upload's file name (``("video", name, (duration, expected frames))`` for a video clip),
    or the JSON error."""
    try:
        name, size = _extract_file(spool, ctype, path)
    except ValueError as e:
        return {"error": {"kind": "missing_file", "message": f"could not read the multipart form: {e}"}}
    finally:
        spool.close()
    if name is None:
        return {"error": {"kind": "missing_file", "message": "no 'file' field in the form"}}
    if size > limit:
        return {"error": {"kind": "too_large", "message": f"file of {size:,} bytes is above the {mb} limit"}}
    if not size:
        return {"error": {"kind": "empty_file", "message": "the uploaded file is empty"}}
    if jobs is not None and looks_like_video(path, name):
        try:  # the container's header: decode budget, a video stream, the duration
            return ("video", name, jobs.check(path))
        except ItemError as e:
            return {"error": {"kind": e.kind, "message": f"{name or 'the clip'}: {e.message.replace(path, '').strip(': ')}"}}
    try:  # header checks (decode budget, format, size) before any decoding
        probe(path)
    except ItemError as e:
        return {"error": {"kind": e.kind, "message": public_paths(e.message, {path: name or "the upload"})}}
    return name


async def _receive_body(request: Request, sink: IO[bytes], cap: int, idle_s: float, deadline_s: float) -> tuple[str, str] | None:
    """Copy the request body into ``sink``; None when complete, else ``(kind, message)``: above
    ``cap`` bytes, no data for ``idle_s`` seconds, not complete within ``deadline_s``, or the
    client went away."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    seen = 0
    while True:
        wait = min(idle_s, end - loop.time())
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            msg = await asyncio.wait_for(request.receive(), wait)
        except asyncio.TimeoutError:
            return "body_timeout", (f"the upload stalled: no data for {idle_s:g} s" if loop.time() < end
                                    else f"the upload was not complete after {deadline_s:g} s")
        if msg["type"] == "http.disconnect":
            return "body_timeout", "the client closed the connection before the upload was complete"
        chunk = msg.get("body", b"")
        seen += len(chunk)
        if seen > cap:
            return "too_large", f"upload is above the {cap / 1024 / 1024:.3g} MB limit"
        if chunk:
            sink.write(chunk)  # the first SPOOL_BYTES in memory, the rest to a temporary file
        if not msg.get("more_body", False):
            sink.seek(0)
            return None


def _extract_file(body: IO[bytes], content_type: str, dest: str) -> tuple[str | None, int]:
    """Parse a multipart body (from a file) and write its first ``file`` field to ``dest``:
    ``(filename or "" , bytes written)``, or ``(None, 0)`` without one. ValueError for a malformed
    form or one with more than :data:`MAX_FORM_PARTS` parts."""
    from python_multipart.multipart import MultipartParser, parse_options_header  # lazy (start-up time)

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ValueError("no boundary in the Content-Type header")
    state: dict[str, Any] = {"parts": 0, "field": b"", "headers": {}, "target": None, "name": None, "size": 0}
    with open(dest, "wb") as out:
        def on_part_begin() -> None:
            state["parts"] += 1
            if state["parts"] > MAX_FORM_PARTS:
                raise ValueError(f"more than {MAX_FORM_PARTS} parts")
            state["headers"], state["target"] = {}, None

        def on_header_field(data: bytes, start: int, end: int) -> None:
            state["field"] += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            key = state["field"].lower()
            state["headers"][key] = state["headers"].get(key, b"") + data[start:end]

        def on_header_end() -> None:
            state["field"] = b""

        def on_headers_finished() -> None:
            _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
            if disp.get(b"name") == b"file" and state["name"] is None:
                state["name"] = disp.get(b"filename", b"").decode("utf-8", "replace")
                state["target"] = out

        def on_part_data(data: bytes, start: int, end: int) -> None:
            if state["target"] is not None:
                state["target"].write(data[start:end])
                state["size"] += end - start

        def on_part_end() -> None:
            state["target"] = None

        parser = MultipartParser(boundary, {
            "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        })
        try:
            while chunk := body.read(64 * 1024):
                parser.write(chunk)
            parser.finalize()
        except ValueError:
            raise
        except Exception as e:  # python-multipart's own parse errors
            raise ValueError(str(e) or type(e).__name__) from e
    if state["name"] is None:
        return None, 0
    return upload_name(state["name"]), int(state["size"])
