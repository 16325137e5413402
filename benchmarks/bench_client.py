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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tagfer.models.openai_client import ChatClient, ClientConfig, system_message, user_message  # noqa: E402


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


async def run_level(urls: list[str], conc: int, n: int, messages: list[dict]) -> tuple[float, float, int]:
    per = max(1, -(-conc // len(urls)))
    cfg = ClientConfig(endpoints=urls, model="fake-vlm", api_key="", per_endpoint_concurrency=per,
                       total_concurrency=conc, timeout_s=60, max_retries=2)
    async with ChatClient(cfg) as client:
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
    a = ap.parse_args()

    from tagfer.models.openai_client import image_part
    from tagfer.models.prompts import tag_prompt

    system, user = tag_prompt()
    images = []
    if a.image:
        from tagfer.core.samples import sample_face_path

        images = [image_part(sample_face_path("astronaut"), 224)]
    messages = [system_message(system), user_message(user, images)]
    payload = len(json.dumps(messages))

    print(f"client: tagfer.models.openai_client.ChatClient; request body ≈ {payload / 1024:.1f} KiB; {a.servers} fake server process(es)")
    print(f"{'L s':>5} {'jit':>4} {'C':>5} {'requests':>8} {'req/s':>8} {'C/L':>8} {'ratio':>6} {'client CPU ms/req':>18} "
          f"{'max in flight':>13} {'server CPU ms/req':>17} errors")
    for latency, jitter in ((float(x), float(j)) for j in a.jitter.split(",") for x in a.latency.split(",")):
        if jitter and a.uvicorn:
            continue
        procs = start_servers(a.servers, latency, raw=not a.uvicorn, jitter=jitter)
        try:
            urls = [p.stdout.readline().strip() for p in procs]
            rounds = max(6, round(a.rounds * 0.2 / latency)) if latency > 0.2 else a.rounds
            for conc in (int(c) for c in a.conc.split(",")):
                n = conc * rounds
                server_stats(procs, "reset")
                cpu_srv0 = sum(s["cpu_s"] for s in server_stats(procs))
                wall, cpu, errors = asyncio.run(run_level(urls, conc, n, messages))
                stats = server_stats(procs)
                srv_cpu = (sum(s["cpu_s"] for s in stats) - cpu_srv0) / (n + conc)
                rate = n / wall
                ideal = conc / latency
                print(f"{latency:>5.2f} {jitter:>4.1f} {conc:>5} {n:>8} {rate:>8.0f} {ideal:>8.0f} {rate / ideal:>6.2f} {1000 * cpu / n:>18.3f} "
                      f"{sum(s['max_in_flight'] for s in stats):>13} {1000 * srv_cpu:>17.3f} {errors}", flush=True)
        finally:
            stop_servers(procs)


if __name__ == "__main__":
    main()
