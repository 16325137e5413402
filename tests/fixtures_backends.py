"""Session fixtures for the backends tests (imported by conftest.py).

``fake_openai`` is a factory: ``srv = fake_openai(script, latency_s=0.0)`` starts a
:class:`fakeserver.FakeOpenAIServer` and returns it; every server made is stopped at the
end of the session. Reuse one server across tests with ``srv.reset(new_script)`` when speed
matters.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fake_openai():
    from fakeserver import FakeOpenAIServer

    servers: list[FakeOpenAIServer] = []

    def make(script=None, latency_s: float = 0.0, model: str = "fake-vlm", **kw) -> FakeOpenAIServer:
        srv = FakeOpenAIServer(script, latency_s=latency_s, model=model, **kw).start()
        servers.append(srv)
        return srv

    yield make
    # Stop them together: each stop waits up to uvicorn's graceful shutdown (1 s) for keep-alive
    # connections, which one after another cost ~6 s at the end of every session.
    import threading

    stops = [threading.Thread(target=srv.stop) for srv in servers]
    for t in stops:
        t.start()
    for t in stops:
        t.join()
