"""Load on loopback: 100 concurrent SSE clients following a live run, and 1,000 API requests, without errors.

The real server runs in a subprocess (uvicorn, one process) with the fake trainer, so the load is on the
Studio itself: auth, routing, SQLite, file tailing and streaming. Bounded in count and time; 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from studio_testkit import PASSWORD, LiveServer

pytestmark = pytest.mark.load
httpx = pytest.importorskip("httpx")

N_SSE = 100
N_REQUESTS = 1000
CONCURRENCY = 50
TIME_LIMIT_S = 90


async def follow(client: httpx.AsyncClient, run_id: str, need_new_steps: int) -> int:
    """Read the run's event stream until it has delivered `need_new_steps` steps beyond the first burst."""
    first_max = None
    async with client.stream("GET", f"/api/runs/{run_id}/events") as r:
        assert r.status_code == 200
        event = None
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "metrics":
                top = max(m["step"] for m in json.loads(line[6:]))
                if first_max is None:
                    first_max = top
                elif top >= first_max + need_new_steps:
                    return top
    raise AssertionError("stream ended early")


async def hammer(client: httpx.AsyncClient, run_id: str, ds_id: str) -> list[int]:
    paths = ["/api/runs", f"/api/runs/{run_id}", f"/api/runs/{run_id}/metrics", "/api/models",
             "/api/datasets", "/api/info", f"/api/runs/{run_id}/logs?tail=50", "/api/exports",
             f"/api/datasets/{ds_id}/preview?n=2", "/api/chat/status"]
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> int:
        async with sem:
            return (await client.get(paths[i % len(paths)])).status_code

    return await asyncio.gather(*(one(i) for i in range(N_REQUESTS)))


async def scenario(url: str) -> tuple[list[int], list[int], float]:
    limits = httpx.Limits(max_connections=N_SSE + CONCURRENCY + 10, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        assert (await client.post("/api/auth/login", json={"password": PASSWORD})).status_code == 200
        ds = (await client.post("/api/datasets/sample")).json()
        run = (await client.post("/api/runs", json={"model_id": "embeddedtiny", "dataset_id": ds["id"],
                                                     "max_steps": 100000})).json()
        t0 = time.monotonic()
        streams = [asyncio.create_task(follow(client, run["id"], 3)) for _ in range(N_SSE)]
        codes = await hammer(client, run["id"], ds["id"])
        steps = await asyncio.wait_for(asyncio.gather(*streams), timeout=TIME_LIMIT_S)
        elapsed = time.monotonic() - t0
        assert (await client.post(f"/api/runs/{run['id']}/stop")).status_code == 200
        return codes, steps, elapsed


def test_100_sse_clients_and_1000_requests(tmp_path):
    env = {"FAKE_TRAIN_MODE": "hang", "FAKE_TRAIN_STEP_S": "0.1"}
    with LiveServer(tmp_path / "data", password=PASSWORD, fake=("train", "tiny", "chat", "export"),
                    fake_library=("summary", "memory", "formats"), env=env) as server:
        codes, steps, elapsed = asyncio.run(scenario(server.url))
    assert len(codes) == N_REQUESTS and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    assert len(steps) == N_SSE and all(s > 0 for s in steps)
    assert elapsed < TIME_LIMIT_S
    print(f"{N_SSE} SSE clients + {N_REQUESTS} requests in {elapsed:.1f} s")
