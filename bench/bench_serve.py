"""``moesteer serve`` under 1, 4 and 8 concurrent clients, against the same work in the in-process engine.

The server (the embedded model, a free 127.0.0.1 port) gets ``REQUESTS`` completions per setting
from ``C`` concurrent ``AsyncOpenAI`` clients (greedy, ``NEW_TOKENS`` tokens, EOS ignored), plain,
SCMoE and RoE N=4: requests/s, tokens/s, latency p50 / p99. Then, in a separate process once the
server has stopped (two engines at once on 2 cores ruin both), the in-process ``VLLMEngine`` runs the
same requests ``C`` prompts a call; the overhead is the server's wall time over the engine's
(target <= 1.2 at 8 clients). Run: ``.venv/bin/python bench/bench_serve.py [--quick]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from figures import QUICK, record, scaled, table

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = scaled(32, 8)
REQUESTS = scaled(24, 8)
CLIENTS = (1, 4, 8)
STRATEGIES = {"plain": None, "scmoe": "scmoe(beta=0.5)", "roe N=4": "roe(samples=4, tau=0.3)"}
PROMPTS = [f"Q: {a} + {b} * {c} = ?\n" for a, b, c in [(12, 7, 3), (5, 6, 4), (81, 9, 8), (2, 3, 4)]]


@dataclass(frozen=True)
class Load:
    """What one setting measured."""

    seconds: float
    latencies: list[float]
    tokens: int

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _drive(url: str, strategy: str | None, clients: int) -> Load:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(clients)
    extra = {"ignore_eos": True} | ({"vllm_xargs": {"moesteer": strategy}} if strategy else {})

    async def one(i: int) -> tuple[float, int]:
        async with gate:
            start = time.perf_counter()
            response = await client.completions.create(
                model="tiny-arith-moe",
                prompt=PROMPTS[i % len(PROMPTS)],
                max_tokens=NEW_TOKENS,
                temperature=0.0,
                extra_body=extra,
            )
            return time.perf_counter() - start, response.usage.completion_tokens

    await asyncio.gather(*(one(i) for i in range(clients)))  # warm-up
    start = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    seconds = time.perf_counter() - start
    await client.close()
    return Load(seconds, [d[0] for d in done], sum(d[1] for d in done))


def serve_loads() -> dict[str, dict[int, Load]]:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "moesteer", "serve", "--port", str(port), "--disable-uvicorn-access-log"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    server = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moesteer serve did not start: {server.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        return {
            name: {c: asyncio.run(_drive(url, strategy, c)) for c in CLIENTS} for name, strategy in STRATEGIES.items()
        }
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)


def child() -> None:
    """Print ``{strategy: {clients: seconds}}``: the in-process engine on the same requests."""
    import moesteer
    from moesteer.sampling import SamplingParams
    from moesteer.strategies import spec

    lm = moesteer.load(None, backend="vllm")
    sampling = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(REQUESTS)]
    out: dict[str, dict[int, float]] = {}
    for name, text in STRATEGIES.items():
        strategy = spec.parse(text or "plain")
        for clients in CLIENTS:
            lm.generate(prompts[:clients], strategy, sampling)  # warm-up
            start = time.perf_counter()
            for at in range(0, REQUESTS, clients):
                lm.generate(prompts[at : at + clients], strategy, sampling)
            out.setdefault(name, {})[clients] = time.perf_counter() - start
    print(json.dumps(out))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child()
        return
    loads = serve_loads()
    out = subprocess.run(
        [sys.executable, __file__, "--child"], capture_output=True, text=True, check=True, cwd=ROOT, env=os.environ
    )
    engine = {name: {int(c): s for c, s in by.items()} for name, by in json.loads(out.stdout).items()}
    rows = []
    for name in STRATEGIES:
        for clients in CLIENTS:
            load, alone = loads[name][clients], engine[name][clients]
            overhead = load.seconds / alone
            rows.append(
                [
                    name,
                    str(clients),
                    f"{REQUESTS / load.seconds:.2f}",
                    f"{load.tokens / load.seconds:.0f}",
                    f"{load.percentile(0.5) * 1000:.0f}",
                    f"{load.percentile(0.99) * 1000:.0f}",
                    f"{overhead:.2f}",
                ]
            )
            record(f"{name} {clients} clients: server req/s", REQUESTS / load.seconds, unit="req/s")
            target = 1.2 if clients == max(CLIENTS) else None
            record(f"{name} {clients} clients: server / in-process time", overhead, at_most=target)
    print(f"\n== moesteer serve, embedded model: {REQUESTS} requests x {NEW_TOKENS} tokens a setting")
    print(table(rows, ["strategy", "clients", "req/s", "tok/s", "p50 ms", "p99 ms", "server / in-process"]))
    print("target: server / in-process time <= 1.2 at 8 clients" + (" (quick run)" if QUICK else ""))


if __name__ == "__main__":
    main()
