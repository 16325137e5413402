"""Throughput of tagfer.models.openai_client.ChatClient against fake servers with fixed latency.

    .venv/bin/python benchmarks/bench_client.py [--latency 0.2,2.0] [--conc 64,256,512] [--servers 4] [--image]

With latency L per request and C requests in flight the ideal rate is C/L; the goal is a
ratio >= 0.9 at C=512. ``--jitter j`` draws each latency uniformly from L·[1-j, 1+j] (same
mean): with a fixed latency all C responses of a round arrive together and the event loop
handles them as one burst before the next round is sent, so each round costs about
L + C × (client time per request); real model latencies vary and bursts spread out. The fake servers run in their own processes (tests/fakeserver.py)
so that the client's CPU time per request is measured alone (process CPU time of this
process / requests). ``--servers N`` spreads the load over N endpoints (the paper: 4 GPU
servers, 128 each); the per-endpoint limit is C/N.

``--clients`` lists the clients measured at each level, side by side (the last column is the
client CPU per request relative to the first client's):

- ``tagfer``: ``ChatClient`` as it is (its ``PooledTransport``);
- ``one-pool``: ``ChatClient`` over a plain ``httpx.AsyncHTTPTransport`` (one httpcore pool of
  up to 1,000 connections: the HTTP layer of ``httpx.AsyncClient`` and of the ``openai`` SDK);
- ``git:REF``: ``tagfer/models/openai_client.py`` as of git revision REF (e.g. ``git:main``),
  loaded on its own, to compare a change with the code before it in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import tagfer.models.openai_client as current  # noqa: E402
from tagfer.models.openai_client import system_message, user_message  # noqa: E402


def load_client(name: str, tmp: Path) -> tuple[ModuleType, dict[str, Any]]:
    """The client module and extra ``ChatClient`` kwargs for a ``--clients`` entry."""
    if name == "tagfer":
        return current, {}
    if name == "one-pool":
        import httpx

        return current, {"transport": lambda: httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=1000))}
    if name.startswith("git:"):
        ref = name[4:]
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:src/tagfer/models/openai_client.py"],
                             check=True, capture_output=True, text=True).stdout
        path = tmp / f"openai_client_{len(list(tmp.iterdir()))}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"bench_client_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        return mod, {}
    raise SystemExit(f"unknown client {name!r}: tagfer, one-pool or git:REF")


def start_servers(n: int, latency: float, raw: bool = True, jitter: float = 0.0) -> list[subprocess.Popen]:
    procs = []
    extra = ["--raw", "--jitter", str(jitter)] if raw else []
    for _ in range(n):
        p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fakeserver.py"), "--latency", str(latency)] + extra,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(p)
    return procs


def stop_servers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            p.stdin.write("stop\n")
            p.stdin.flush()
            p.stdin.close()
        except (BrokenPipeError, OSError):
            pass
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def server_stats(procs: list[subprocess.Popen], cmd: str = "stats") -> list[dict]:
    out = []
    for p in procs:
        p.stdin.write(cmd + "\n")
        p.stdin.flush()
        out.append(json.loads(p.stdout.readline()))
    return out


async def run_level(mod: ModuleType, extra: dict[str, Any], urls: list[str], conc: int, n: int,
                    messages: list[dict]) -> tuple[float, float, int]:
    per = max(1, -(-conc // len(urls)))
    cfg = mod.ClientConfig(endpoints=urls, model="fake-vlm", api_key="", per_endpoint_concurrency=per,
                           total_concurrency=conc, timeout_s=60, max_retries=2)
    kw = {k: v() for k, v in extra.items()}
    async with mod.ChatClient(cfg, **kw) as client:
        # warm-up: open the connections
        await asyncio.gather(*(client.chat(messages, max_tokens=8) for _ in range(conc)))
        errors = 0

        async def one() -> None:
            nonlocal errors
            try:
                await client.chat(messages, temperature=0.0, max_tokens=512)
            except Exception:  # noqa: BLE001
                errors += 1

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return time.perf_counter() - t0, time.process_time() - cpu0, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency", default="0.2,2.0", help="comma-separated server latencies (s)")
    ap.add_argument("--conc", default="64,256,512")
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8, help="requests per level = rounds × C at L=0.2 (fewer for larger L)")
    ap.add_argument("--jitter", default="0,0.5", help="comma-separated latency jitters j: latency uniform in L·[1-j, 1+j]")
    ap.add_argument("--uvicorn", action="store_true", help="use the uvicorn fake server (heavier) instead of the raw responder")
    ap.add_argument("--image", action="store_true", help="send a 224-px PNG data URL with every request")
    ap.add_argument("--clients", default="tagfer", help="comma-separated: tagfer, one-pool, git:REF (see the docstring)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_client_"))
    clients = [(name, *load_client(name, tmp)) for name in a.clients.split(",")]

    from tagfer.models.openai_client import image_part
    from tagfer.models.prompts import tag_prompt

    system, user = tag_prompt()
    images = []
    if a.image:
        from tagfer.core.samples import sample_face_path

        images = [image_part(sample_face_path("astronaut"), 224)]
    messages = [system_message(system), user_message(user, images)]
    payload = len(json.dumps(messages))

    print(f"clients: {a.clients}; request body ≈ {payload / 1024:.1f} KiB; {a.servers} fake server process(es)")
    width = max(len(c[0]) for c in clients)
    print(f"{'L s':>5} {'jit':>4} {'C':>5} {'client':<{width}} {'requests':>8} {'req/s':>8} {'C/L':>8} {'ratio':>6} "
          f"{'client CPU ms/req':>18} {'max in flight':>13} {'server CPU ms/req':>17} errors {'CPU vs ' + clients[0][0]:>12}")
    for latency, jitter in ((float(x), float(j)) for j in a.jitter.split(",") for x in a.latency.split(",")):
        if jitter and a.uvicorn:
            continue
        procs = start_servers(a.servers, latency, raw=not a.uvicorn, jitter=jitter)
        try:
            urls = [p.stdout.readline().strip() for p in procs]
            rounds = max(6, round(a.rounds * 0.2 / latency)) if latency > 0.2 else a.rounds
            for conc in (int(c) for c in a.conc.split(",")):
                n = conc * rounds
                first_cpu = None
                for name, mod, extra in clients:
                    server_stats(procs, "reset")
                    cpu_srv0 = sum(s["cpu_s"] for s in server_stats(procs))
                    wall, cpu, errors = asyncio.run(run_level(mod, extra, urls, conc, n, messages))
                    stats = server_stats(procs)
                    srv_cpu = (sum(s["cpu_s"] for s in stats) - cpu_srv0) / (n + conc)
                    rate = n / wall
                    ideal = conc / latency
                    first_cpu = first_cpu or cpu
                    print(f"{latency:>5.2f} {jitter:>4.1f} {conc:>5} {name:<{width}} {n:>8} {rate:>8.0f} {ideal:>8.0f} {rate / ideal:>6.2f} "
                          f"{1000 * cpu / n:>18.3f} {sum(s['max_in_flight'] for s in stats):>13} {1000 * srv_cpu:>17.3f} {errors:>6} "
                          f"{cpu / first_cpu:>12.2f}", flush=True)
        finally:
            stop_servers(procs)


if __name__ == "__main__":
    main()
