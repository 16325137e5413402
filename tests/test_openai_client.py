"""tagfer.models.openai_client against the scripted fake server: retries, limits, balancing, images."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fakeserver import Reply
from tagfer.core.imageio import ImageError
from tagfer.models.chat_retries import Slots, retry_after_s
from tagfer.models.openai_client import (
    ChatClient,
    ClientConfig,
    RequestFailed,
    chat_many,
    encode_image,
    image_part,
    normalize_endpoint,
    system_message,
    user_message,
)

MSGS = [user_message("hello")]


def fast_cfg(*urls: str, **kw) -> ClientConfig:
    """Tiny timeouts and back-off so failure paths run in milliseconds."""
    base = dict(timeout_s=5.0, backoff_base_s=0.001, backoff_max_s=0.01, max_retries=3, api_key="")
    base.update(kw)
    return ClientConfig(endpoints=list(urls), **base)


def run_chat(cfg: ClientConfig, messages=MSGS, sleep=None, **params):
    async def go():
        async with ChatClient(cfg, sleep=sleep) as c:
            return await c.chat(messages, **params)

    return asyncio.run(go())


def run_many(cfg: ClientConfig, n: int, **params):
    async def go():
        async with ChatClient(cfg) as c:
            return await asyncio.gather(*(c.chat([user_message(f"q{i}")], **params) for i in range(n))), c.served

    return asyncio.run(go())


@pytest.fixture(scope="module")
def srv(fake_openai):
    return fake_openai()


class RecordingSleep:
    def __init__(self):
        self.waits: list[float] = []

    async def __call__(self, s: float) -> None:
        self.waits.append(s)


# ----------------------------------------------------------------------------- success paths

def test_success_discovers_model_and_sends_params(srv):
    srv.reset(["the answer"])
    r = run_chat(fast_cfg(srv.url, api_key="sk-test"), [system_message("sys"), user_message("hi")], temperature=0.0, max_tokens=7, seed=None)
    assert r.text == "the answer" and r.finish_reason == "stop" and r.attempts == 1
    assert r.endpoint == srv.url and r.usage["total_tokens"] > 0
    (req,) = srv.requests
    assert req["model"] == "fake-vlm"  # discovered through GET /models
    assert req["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    assert req["temperature"] == 0.0 and req["max_tokens"] == 7 and "seed" not in req  # None params dropped
    assert srv.request_headers[0]["authorization"] == "Bearer sk-test"


def test_explicit_model_and_no_auth_header(srv):
    srv.reset([Reply(text="x", finish_reason="length")])
    r = run_chat(fast_cfg(srv.url, model="my-model"))
    assert srv.requests[0]["model"] == "my-model" and r.finish_reason == "length"
    assert "authorization" not in srv.request_headers[0]


def test_null_content_is_empty_text(srv):
    srv.reset([Reply(body={"choices": [{"message": {"role": "assistant", "content": None}, "finish_reason": "stop"}]})])
    assert run_chat(fast_cfg(srv.url, model="m")).text == ""


# ----------------------------------------------------------------------------- retries

def test_429_then_success_honours_retry_after(srv):
    srv.reset([Reply(status=429, headers={"Retry-After": "7"}), "ok after 429"])
    sleep = RecordingSleep()
    r = run_chat(fast_cfg(srv.url, model="m", backoff_max_s=30.0), sleep=sleep)
    assert r.text == "ok after 429" and r.attempts == 2 and srv.calls == 2
    assert sleep.waits == [7.0]  # the server's wait, not the tiny back-off


def test_retry_after_really_waits(srv):
    srv.reset([Reply(status=429, headers={"Retry-After": "1"}), "ok"])
    r = run_chat(fast_cfg(srv.url, model="m", backoff_max_s=5.0))
    assert r.attempts == 2
    assert srv.request_times[1] - srv.request_times[0] >= 0.95  # a lower bound: sleeping never ends early


def test_retry_after_is_capped_by_backoff_max(srv):
    srv.reset([Reply(status=503, headers={"Retry-After": "3600"}), "ok"])
    sleep = RecordingSleep()
    run_chat(fast_cfg(srv.url, model="m", backoff_max_s=2.0), sleep=sleep)
    assert sleep.waits == [2.0]


def test_500_twice_then_success_with_exponential_backoff(srv):
    srv.reset([Reply(status=500), Reply(status=502), "fine"])
    sleep = RecordingSleep()
    r = run_chat(fast_cfg(srv.url, model="m", backoff_base_s=1.0, backoff_max_s=100.0), sleep=sleep)
    assert r.text == "fine" and r.attempts == 3 and srv.calls == 3
    assert len(sleep.waits) == 2
    assert 0.5 <= sleep.waits[0] <= 1.0 and 1.0 <= sleep.waits[1] <= 2.0  # base·2^(n-1)·U(0.5, 1)


def test_500_forever_exhausts_budget(srv):
    srv.reset(lambda req, i: Reply(status=500, text="boom"))
    with pytest.raises(RequestFailed) as ei:
        run_chat(fast_cfg(srv.url, model="m", max_retries=2))
    assert ei.value.kind == "http_500" and ei.value.attempts == 3 and srv.calls == 3
    assert ei.value.status == 500 and "boom" in ei.value.message


def test_hang_times_out_and_is_retried(srv):
    srv.reset(lambda req, i: Reply(hang=True))
    with pytest.raises(RequestFailed) as ei:
        run_chat(fast_cfg(srv.url, model="m", timeout_s=0.2, max_retries=2))
    assert ei.value.kind == "timeout" and ei.value.attempts == 3
    deadline = time.monotonic() + 5
    while srv.calls < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.calls == 3


def test_hang_then_success(srv):
    srv.reset([Reply(hang=True), "recovered"])
    r = run_chat(fast_cfg(srv.url, model="m", timeout_s=0.2))
    assert r.text == "recovered" and r.attempts == 2


def test_deadline_bounds_the_whole_request(srv):
    srv.reset(lambda req, i: Reply(hang=True))
    with pytest.raises(RequestFailed) as ei:
        run_chat(fast_cfg(srv.url, model="m", timeout_s=30.0, max_retries=5, deadline_s=0.3))
    assert ei.value.kind == "timeout" and ei.value.attempts == 1  # the attempt got only the remaining budget


def test_dropped_connection_is_retried(srv):
    srv.reset([Reply(drop=True), Reply(drop=True), "after drops"])
    r = run_chat(fast_cfg(srv.url, model="m"))
    assert r.text == "after drops" and r.attempts == 3


def test_dropped_forever_is_connection_error(srv):
    srv.reset(lambda req, i: Reply(drop=True))
    with pytest.raises(RequestFailed) as ei:
        run_chat(fast_cfg(srv.url, model="m", max_retries=1))
    assert ei.value.kind == "connection" and ei.value.attempts == 2


def test_malformed_body_retried_then_bad_response(srv):
    srv.reset([Reply(body="{not json"), Reply(body={"no": "choices"}), Reply(body="[]"), Reply(body=b"\xff\xfe")])
    with pytest.raises(RequestFailed) as ei:
        run_chat(fast_cfg(srv.url, model="m", max_retries=3))
    assert ei.value.kind == "bad_response" and ei.value.attempts == 4 and srv.calls == 4


def test_deeply_nested_body_is_a_bad_response_not_a_crash(srv):
    # json.loads raises RecursionError (not ValueError) past the recursion limit
    srv.reset([Reply(body="[" * 100_000), Reply(body='{"choices": ' + "[" * 100_000)])
    with pytest.raises(RequestFailed) as ei:
        run_chat(fast_cfg(srv.url, model="m", max_retries=1))
    assert ei.value.kind == "bad_response" and ei.value.attempts == 2


def test_malformed_then_good(srv):
    srv.reset([Reply(body="{not json"), "good"])
    assert run_chat(fast_cfg(srv.url, model="m")).attempts == 2


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_client_errors_fail_at_once(srv, status):
    srv.reset(lambda req, i: Reply(status=status, text="nope"))
    sleep = RecordingSleep()
    with pytest.raises(RequestFailed) as ei:
        run_chat(fast_cfg(srv.url, model="m", max_retries=5), sleep=sleep)
    assert ei.value.kind == f"http_{status}" and ei.value.attempts == 1 and srv.calls == 1 and sleep.waits == []


def test_connection_refused_is_connection_kind():
    port = _closed_port()
    with pytest.raises(RequestFailed) as ei:
        run_chat(fast_cfg(f"http://127.0.0.1:{port}/v1", model="m", max_retries=1))
    assert ei.value.kind == "connection" and ei.value.attempts == 2


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def test_model_discovery_failure_is_reported_once():
    cfg = fast_cfg(f"http://127.0.0.1:{_closed_port()}/v1", model=None, max_retries=1)
    with pytest.raises(RequestFailed) as ei:
        run_chat(cfg)
    assert "cannot discover the model name" in ei.value.message and ei.value.kind == "connection"

    async def many():
        async with ChatClient(cfg) as c:
            out = await asyncio.gather(*(c.chat(MSGS) for _ in range(20)), return_exceptions=True)
            return out, c.served

    out, served = asyncio.run(many())
    assert all(isinstance(e, RequestFailed) and "cannot discover" in e.message for e in out)
    assert sum(served.values()) == 2  # one discovery (2 attempts), shared by the 19 queued requests


# ----------------------------------------------------------------------------- concurrency

def test_per_endpoint_limit_is_reached_not_exceeded(fake_openai):
    srv = fake_openai(latency_s=0.15)
    cfg = fast_cfg(srv.url, model="m", per_endpoint_concurrency=6, total_concurrency=100)
    results, _ = run_many(cfg, 30)
    assert len(results) == 30 and srv.max_in_flight == 6


def test_total_limit_across_endpoints(fake_openai):
    srv = fake_openai(latency_s=0.15)
    root = srv.url[: -len("/v1")]
    # One server posing as three endpoints: its in-flight count is the client's total.
    cfg = fast_cfg(srv.url, root + "/b/v1", root + "/c/v1", model="m", per_endpoint_concurrency=4, total_concurrency=5)
    results, served = run_many(cfg, 30)
    assert len(results) == 30 and srv.max_in_flight == 5
    assert all(v > 0 for v in served.values())


def test_per_endpoint_limit_with_several_endpoints(fake_openai):
    srv = fake_openai(latency_s=0.15)
    root = srv.url[: -len("/v1")]
    cfg = fast_cfg(srv.url, root + "/b/v1", model="m", per_endpoint_concurrency=3, total_concurrency=100)
    run_many(cfg, 24)
    assert srv.max_in_flight == 6  # 2 endpoints × 3


def test_two_endpoints_balanced(fake_openai):
    a, b = fake_openai(latency_s=0.03), fake_openai(latency_s=0.03)
    cfg = fast_cfg(a.url, b.url, model="m", per_endpoint_concurrency=4, total_concurrency=100)
    results, served = run_many(cfg, 60)
    assert {r.endpoint for r in results} == {a.url, b.url}
    assert a.calls + b.calls == 60
    assert abs(a.calls - b.calls) <= 10, (a.calls, b.calls)


def test_least_in_flight_prefers_the_fast_endpoint(fake_openai):
    fast, slow = fake_openai(latency_s=0.01), fake_openai(latency_s=0.3)
    cfg = fast_cfg(fast.url, slow.url, model="m", per_endpoint_concurrency=4, total_concurrency=4)
    run_many(cfg, 40)
    assert fast.calls > 2 * slow.calls  # slots free up faster on the fast server


def test_retry_moves_to_another_endpoint(fake_openai):
    bad = fake_openai(lambda req, i: Reply(status=503))
    good = fake_openai()
    cfg = fast_cfg(bad.url, good.url, model="m", max_retries=1, per_endpoint_concurrency=64)
    results, _ = run_many(cfg, 20)
    assert all(r.text == "ok" and r.endpoint == good.url and r.attempts <= 2 for r in results)


# ----------------------------------------------------------------------------- images

def _decode_data_url(url: str) -> Image.Image:
    head, b64 = url.split(",", 1)
    assert head.startswith("data:image/") and head.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_image_sent_as_data_url_resized(srv, astronaut_path):
    srv.reset(["seen"])
    wide = Image.new("RGB", (600, 300), (10, 200, 30))
    cfg = fast_cfg(srv.url, model="m", image_side=224)

    async def go():
        async with ChatClient(cfg) as c:
            return await c.chat([c.user_message("what?", [wide])])

    assert asyncio.run(go()).text == "seen"
    content = srv.requests[0]["messages"][0]["content"]
    assert content[0]["type"] == "image_url" and content[1] == {"type": "text", "text": "what?"}
    img = _decode_data_url(content[0]["image_url"]["url"])
    assert img.format == "PNG" and img.size == (224, 112)
    assert img.convert("RGB").getpixel((100, 50)) == (10, 200, 30)  # PNG is lossless


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_image_part_from_path_and_bytes(astronaut_path, fmt):
    for src in (astronaut_path, astronaut_path.read_bytes()):
        part = image_part(src, side=160, fmt=fmt)
        img = _decode_data_url(part["image_url"]["url"])
        assert img.format == fmt.upper() and max(img.size) == 160 and img.mode == "RGB"


def test_image_part_small_image_upscaled_and_none_keeps_size():
    small = Image.new("L", (50, 100), 128)
    assert _decode_data_url(encode_image(small, side=224)).size == (112, 224)
    assert _decode_data_url(encode_image(small, side=None)).size == (50, 100)


def test_image_part_corrupt_raises_image_error(bad_inputs):
    with pytest.raises(ImageError) as ei:
        image_part(bad_inputs["corrupt"])
    assert ei.value.kind == "corrupt"
    with pytest.raises(ImageError):
        image_part(bad_inputs["not_found"])


def test_user_message_shapes():
    assert user_message("t") == {"role": "user", "content": "t"}
    ready = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert user_message("t", [ready])["content"] == [ready, {"type": "text", "text": "t"}]


# ----------------------------------------------------------------------------- sync helper

def test_chat_many_keeps_order_and_records_errors(srv):
    srv.reset(lambda req, i: Reply(status=400, text="bad prompt") if "bad" in req["messages"][0]["content"] else Reply(text=req["messages"][0]["content"].upper()))
    prompts = ["a", "bad", "c", "d"]
    seen = []
    out = chat_many(fast_cfg(srv.url, model="m"), [[user_message(p)] for p in prompts], {"temperature": 0}, on_result=lambda i, r: seen.append(i))
    assert [getattr(r, "text", None) for r in out] == ["A", None, "C", "D"]
    assert isinstance(out[1], RequestFailed) and out[1].kind == "http_400"
    assert sorted(seen) == [0, 1, 2, 3]


def test_chat_many_inside_running_loop(srv):
    srv.reset(lambda req, i: "x")

    async def inside():
        return chat_many(fast_cfg(srv.url, model="m"), [MSGS, MSGS])

    out = asyncio.run(inside())
    assert [r.text for r in out] == ["x", "x"]


# ----------------------------------------------------------------------------- pure helpers

def test_normalize_endpoint():
    assert normalize_endpoint("gpu0:8000") == "http://gpu0:8000/v1"
    assert normalize_endpoint("http://h:1/v1/") == "http://h:1/v1"
    assert normalize_endpoint("https://api.x.com/openai/v1") == "https://api.x.com/openai/v1"
    cfg = ClientConfig(endpoints="a:1,b:2", api_key="")
    assert cfg.endpoints == ["http://a:1/v1", "http://b:2/v1"] and cfg.max_in_flight == 256
    with pytest.raises(ValueError):
        ClientConfig(endpoints=[], api_key="")
    with pytest.raises(ValueError):
        ClientConfig(image_format="gif")


def test_api_key_default_from_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert ClientConfig().api_key == "sk-env"


def test_retry_after_parsing():
    assert retry_after_s("3") == 3.0 and retry_after_s("0.5") == 0.5 and retry_after_s("-2") == 0.0
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    future = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= retry_after_s(future) <= 61


@given(st.lists(st.sampled_from(["acq", "rel"]), max_size=60), st.integers(1, 4), st.integers(1, 5), st.integers(1, 8))
def test_slots_respect_limits_and_pick_least_loaded(ops, n, per, total):
    async def go():
        slots = Slots(n, per, total)
        held: list[int] = []
        for op in ops:
            if op == "acq":
                if slots._pick(None) is None:
                    assert slots.sum == total or all(k == per for k in slots.in_flight)
                    continue
                before = list(slots.in_flight)
                i = await slots.acquire()
                assert before[i] == min(k for k in before if k < per)  # least in flight among free endpoints
                held.append(i)
            elif held:
                await slots.release(held.pop(0))
            assert slots.sum == len(held) <= total
            assert all(0 <= k <= per for k in slots.in_flight)

    asyncio.run(go())


def test_connections_are_kept_alive_and_reused(fake_openai):
    srv = fake_openai(latency_s=0.02)
    cfg = fast_cfg(srv.url, model="m", per_endpoint_concurrency=8, total_concurrency=8)

    async def go():
        async with ChatClient(cfg) as c:
            for _ in range(10):  # sequential: one connection
                await c.chat(MSGS)
            first = srv.connections
            await asyncio.gather(*(c.chat(MSGS) for _ in range(64)))  # 8 at a time
            return first

    assert asyncio.run(go()) == 1
    assert srv.connections <= 8 and srv.calls == 74


def test_broken_connection_is_not_reused(fake_openai):
    srv = fake_openai([Reply(drop=True), "a", "b", "c"])

    async def go():
        async with ChatClient(fast_cfg(srv.url, model="m")) as c:
            return [await c.chat(MSGS) for _ in range(3)]

    out = asyncio.run(go())
    assert [r.text for r in out] == ["a", "b", "c"] and out[0].attempts == 2
    assert srv.connections == 2  # the dropped one, then one kept-alive connection


def test_injected_httpx_transport():
    import httpx

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, str(request.url), request.headers["content-type"]))
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "mock-model"}]})
        body = __import__("json").loads(request.content)
        return httpx.Response(200, json={"choices": [{"message": {"content": f"{body['model']}:{body['messages'][0]['content']}"},
                                                       "finish_reason": "stop"}]})

    async def go():
        async with ChatClient(fast_cfg("http://mock:9/v1"), transport=httpx.MockTransport(handler)) as c:
            return await c.chat(MSGS)

    r = asyncio.run(go())
    assert r.text == "mock-model:hello" and r.usage == {}
    assert seen == [("GET", "http://mock:9/v1/models", "application/json"),
                    ("POST", "http://mock:9/v1/chat/completions", "application/json")]


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl binary not available")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "k.pem"), "-out", str(d / "c.pem"),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return d / "c.pem", d / "k.pem"


def test_https_endpoint_with_ca_bundle_and_untrusted_cert(fake_openai, self_signed):
    cert, key = self_signed
    srv = fake_openai(lambda req, i: "over tls", ssl_certfile=cert, ssl_keyfile=key)
    assert srv.url.startswith("https://")
    assert run_chat(fast_cfg(srv.url, model="m", verify=str(cert))).text == "over tls"
    with pytest.raises(RequestFailed) as ei:  # default trust store: self-signed is refused, not retried
        run_chat(fast_cfg(srv.url, model="m", max_retries=3))
    assert ei.value.kind == "tls" and ei.value.attempts == 1


def test_dead_endpoint_is_ejected(fake_openai):
    good = fake_openai(lambda req, i: "alive")
    dead = f"http://127.0.0.1:{_closed_port()}/v1"
    # a real cool-down of 5 s (backoff_base_s) outlasts the test; retry waits are skipped (RecordingSleep)
    cfg = fast_cfg(dead, good.url, model="m", backoff_base_s=5.0, backoff_max_s=30.0, max_retries=2)

    async def go():
        async with ChatClient(cfg, sleep=RecordingSleep()) as c:
            out = [await c.chat(MSGS) for _ in range(30)]  # one at a time: ties alternate between endpoints
            return out, c.served

    out, served = asyncio.run(go())
    assert all(r.text == "alive" for r in out) and good.calls == 30
    assert 3 <= served[dead] <= 4, served  # 3 failures eject it (a probe only if the test ran > 5 s), instead of ~15


def test_ejection_disabled_keeps_alternating(fake_openai):
    good = fake_openai(lambda req, i: "alive")
    dead = f"http://127.0.0.1:{_closed_port()}/v1"
    cfg = fast_cfg(dead, good.url, model="m", backoff_base_s=0.5, max_retries=2, eject_after=0)

    async def go():
        async with ChatClient(cfg, sleep=RecordingSleep()) as c:
            [await c.chat(MSGS) for _ in range(10)]
            return c.served

    assert asyncio.run(go())[dead] >= 5


def test_all_endpoints_failing_still_reports_errors():
    cfg = fast_cfg(f"http://127.0.0.1:{_closed_port()}/v1", f"http://127.0.0.1:{_closed_port()}/v1", model="m", max_retries=4)
    with pytest.raises(RequestFailed) as ei:
        run_chat(cfg)
    assert ei.value.kind == "connection" and ei.value.attempts == 5  # never blocks on cooling endpoints


def test_fake_server_reports_script_problems(srv):
    srv.reset(["only one"])
    cfg = fast_cfg(srv.url, model="m", max_retries=0)
    assert run_chat(cfg).text == "only one"
    with pytest.raises(RequestFailed) as ei:
        run_chat(cfg)
    assert ei.value.kind == "http_500" and "script exhausted" in srv.script_errors[0]
    srv.reset(lambda req, i: 1 / 0)
    with pytest.raises(RequestFailed):
        run_chat(cfg)
    assert srv.script_errors == ["script raised ZeroDivisionError: division by zero"]


# ----------------------------------------------------------------------------- response size cap

MB = 1024 * 1024


def _peak_while(fn):
    """(result or exception, peak bytes traced by tracemalloc above the start) while ``fn`` runs."""
    import tracemalloc

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - returned for the caller to check
            out = e
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("reply", [
    Reply(size=100 * MB),                          # declared Content-Length: refused before reading
    Reply(size=100 * MB, content_length=False),    # chunked, no length: reading stops at the cap
    Reply(endless=True),                           # never ends: stops at the cap, long before the timeout
    Reply(size=100 * MB, gzip=True),               # a ~100 KB gzip bomb: inflated only up to the cap
], ids=["content-length", "chunked", "endless", "gzip-bomb"])
def test_huge_body_is_cut_at_the_cap_with_bounded_memory(srv, reply):
    srv.reset(lambda req, i: reply)
    cfg = fast_cfg(srv.url, model="m", max_retries=3, timeout_s=60.0, max_response_bytes=1 * MB)
    t0 = time.monotonic()
    err, peak = _peak_while(lambda: run_chat(cfg))
    assert isinstance(err, RequestFailed), err
    assert err.kind == "response_too_large" and err.attempts == 1 and srv.calls == 1  # not retried
    assert "max_response_bytes" in err.message
    assert peak < 4 * MB, peak  # the cap plus copies, not 100 MB
    assert time.monotonic() - t0 < 30  # stopped by the cap, not by the 60 s timeout
    # the server could not push much more than the cap before the client hung up (socket buffers aside)
    assert srv.streamed_bytes < 40 * MB


def test_body_just_under_the_cap_is_read_and_the_connection_reused(srv):
    srv.reset([Reply(size=MB - 10), Reply(size=MB - 10, content_length=False), "small"])

    async def go():
        async with ChatClient(fast_cfg(srv.url, model="m", max_response_bytes=MB)) as c:
            return [await c.chat(MSGS) for _ in range(3)]

    out = asyncio.run(go())
    assert [len(r.text) for r in out[:2]] == [MB - 10 - 89] * 2 and out[2].text == "small"
    assert srv.connections == 1  # fully read bodies leave the connection reusable


def test_oversize_connection_is_not_reused(srv):
    srv.reset([Reply(size=10 * MB, content_length=False), "after"])

    async def go():
        async with ChatClient(fast_cfg(srv.url, model="m", max_response_bytes=MB)) as c:
            with pytest.raises(RequestFailed):
                await c.chat(MSGS)
            return await c.chat(MSGS)

    assert asyncio.run(go()).text == "after" and srv.connections == 2  # the half-read one was closed


def test_huge_bodies_at_high_concurrency_stay_within_the_shared_budget(fake_openai):
    """16 requests each answered with an endless body: memory is bounded by max_buffered_bytes,
    not by concurrency × max_response_bytes; requests over the shared budget retry."""
    srv = fake_openai(lambda req, i: Reply(endless=True))
    cfg = fast_cfg(srv.url, model="m", max_retries=1, timeout_s=60.0, max_response_bytes=4 * MB, max_buffered_bytes=4 * MB,
                   per_endpoint_concurrency=16, total_concurrency=16)

    async def go():
        async with ChatClient(cfg, sleep=RecordingSleep()) as c:
            return await asyncio.gather(*(c.chat(MSGS) for _ in range(16)), return_exceptions=True)

    out, peak = _peak_while(lambda: asyncio.run(go()))
    assert all(isinstance(e, RequestFailed) and e.kind in ("response_too_large", "response_budget") for e in out), out
    assert "response_budget" in {e.kind for e in out}  # 16 × 4 MB cannot all fit in 4 MB
    assert all(e.attempts == 2 for e in out if e.kind == "response_budget")  # retried once (max_retries=1)
    assert sum(e.attempts for e in out) == srv.calls
    # 16 × 4 MB would be 64 MB; what remains is the 4 MB budget plus each connection's socket buffers (~0.3 MB)
    assert peak < 20 * MB, peak


def test_model_list_body_is_capped_too(srv):
    import httpx

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'{"data": [{"id": "' + b"m" * (2 * MB) + b'"}]}')

    async def go():
        async with ChatClient(fast_cfg("http://mock:9/v1", max_response_bytes=MB), transport=httpx.MockTransport(handler)) as c:
            return await c.chat(MSGS)

    with pytest.raises(RequestFailed) as ei:
        asyncio.run(go())
    assert ei.value.kind == "response_too_large" and "cannot discover the model name" in ei.value.message


def test_huge_error_body_keeps_only_its_head(srv):
    srv.reset(lambda req, i: Reply(status=400, size=50 * MB, content_length=False))
    err, peak = _peak_while(lambda: run_chat(fast_cfg(srv.url, model="m", max_response_bytes=8 * MB)))
    assert isinstance(err, RequestFailed) and err.kind == "http_400" and err.attempts == 1
    assert peak < 4 * MB, peak  # not even the 8 MB cap: error bodies are read up to 64 KiB


def test_undecodable_bodies(srv):
    """An unknown Content-Encoding on a 200 is a bad_response (retried); on an error status the
    status stays the kind (the body only feeds the message)."""
    srv.reset(lambda req, i: Reply(body=b"\x00\x01", headers={"content-encoding": "br"}))
    with pytest.raises(RequestFailed) as ei:
        run_chat(fast_cfg(srv.url, model="m", max_retries=1))
    assert ei.value.kind == "bad_response" and ei.value.attempts == 2 and "Content-Encoding" in ei.value.message
    srv.reset(lambda req, i: Reply(status=429, body=b"not gzip at all", headers={"content-encoding": "gzip"}))
    with pytest.raises(RequestFailed) as ei:
        run_chat(fast_cfg(srv.url, model="m", max_retries=1))
    assert ei.value.kind == "http_429" and ei.value.attempts == 2


def test_gzip_reply_within_the_cap_is_inflated(srv):
    srv.reset([Reply(size=200_000, gzip=True)])
    r = run_chat(fast_cfg(srv.url, model="m", max_response_bytes=MB))
    assert len(r.text) == 200_000 - 89 and set(r.text) == {"a"}
    assert srv.request_headers[0]["accept-encoding"] == "identity"


def test_size_limits_are_validated():
    with pytest.raises(ValueError):
        ClientConfig(max_response_bytes=0, api_key="")
    with pytest.raises(ValueError):
        ClientConfig(max_response_bytes=10, max_buffered_bytes=5, api_key="")


def test_chat_messages_system_then_user_with_images_first():
    from tagfer.models.openai_client import chat_messages

    assert chat_messages("hi") == [{"role": "user", "content": "hi"}]
    msgs = chat_messages("look", [Image.new("RGB", (40, 20))], system="be brief", side=None, fmt="jpeg")
    assert [m["role"] for m in msgs] == ["system", "user"] and msgs[0]["content"] == "be brief"
    parts = msgs[1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"] and parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert _decode_data_url(parts[0]["image_url"]["url"]).size == (40, 20) and parts[1]["text"] == "look"
