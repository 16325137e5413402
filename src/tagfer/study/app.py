"""The study's web app: a FastAPI application over :class:`tagfer.study.db.StudyDB`.

Routes::

    GET  /                        the page (static/index.html: name form, image, A/B/tie buttons)
    POST /api/start   {name}      register an evaluator → the next item
    GET  /api/next?name=NAME      the next unvoted pair: {done, pair_id, position, total, completed, responses{A,B}}
    POST /api/vote    {name, pair_id, choice}  record A / B / tie → the next item (409 on a second vote)
    GET  /api/image/{position}    the pair's image file
    GET  /api/health              {"ok": true, "pairs": N}

The page keeps the evaluator's name in ``localStorage``, so a reload continues at the next
pair. Bind to localhost (the default): there is no authentication.
"""

from __future__ import annotations

import os
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from tagfer.judge import Pair
from tagfer.study.db import DuplicateVote, StudyDB

__all__ = ["create_app", "StudyServer", "static_dir"]


def static_dir() -> Path:
    return Path(str(resources.files("tagfer.study") / "static"))


def create_app(pairs: Sequence[Pair], db_path: str | os.PathLike, seed: int = 0):
    """The FastAPI application for ``pairs`` stored in ``db_path``."""
    from fastapi import Body, FastAPI, HTTPException
    from fastapi.responses import FileResponse, HTMLResponse

    db = StudyDB(db_path, pairs, seed=seed)
    app = FastAPI(title="tagfer A/B study", docs_url=None, redoc_url=None)
    app.state.db = db
    page = (static_dir() / "index.html").read_text(encoding="utf-8")

    def bad(e: Exception, status: int = 400):
        raise HTTPException(status_code=status, detail=str(e))

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "pairs": len(db.pairs)}

    @app.post("/api/start")
    def start(payload: dict = Body(...)) -> dict[str, Any]:
        try:
            name = db.register(payload.get("name", ""))
            return db.next_item(name)
        except ValueError as e:
            bad(e)

    @app.get("/api/next")
    def next_item(name: str) -> dict[str, Any]:
        try:
            return db.next_item(name)
        except ValueError as e:
            bad(e)

    @app.post("/api/vote")
    def vote(payload: dict = Body(...)) -> dict[str, Any]:
        try:
            db.vote(payload.get("name", ""), str(payload.get("pair_id", "")), payload.get("choice", ""))
        except DuplicateVote as e:
            bad(e, 409)
        except KeyError as e:
            bad(e, 404)
        except ValueError as e:
            bad(e)
        return db.next_item(payload["name"])

    @app.get("/api/image/{position}")
    def image(position: int):
        if not 0 <= position < len(db.pairs):
            raise HTTPException(status_code=404, detail="no such pair")
        path = Path(db.pairs[position].image)
        if not path.is_file():
            raise HTTPException(status_code=404, detail="image file missing")
        return FileResponse(path)

    return app


class StudyServer:
    """Run the app with uvicorn in a background thread (tests, notebooks): ``with StudyServer(...) as s: s.url``."""

    def __init__(self, pairs: Sequence[Pair], db_path: str | os.PathLike, seed: int = 0, host: str = "127.0.0.1", port: int = 0):
        import socket

        self.app = create_app(pairs, db_path, seed)
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> "StudyServer":
        import uvicorn

        cfg = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(cfg)
        self._thread = threading.Thread(target=self._server.run, name="tagfer-study", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("study server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "StudyServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
