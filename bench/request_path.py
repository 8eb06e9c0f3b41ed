"""The files one native request passes through, in the API process.

    python -m bench.request_path

Starts a Redis and a worker on the fake engine, serves the API in this process
(uvicorn on a thread), and traces one `GET /completion/...?stream=true` from the
moment it is sent until its last event is read: which of textstream's files run
code for it, in the order first entered, and how often the call path moves from
one file to another. Housekeeping that runs meanwhile (the janitor, leases, the
queue watch) is traced too when it runs in that window: the figure is for one
quiet request, run the same way before and after a change.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import uvicorn

from bench.cluster import REPO, free_port, service_env, start_redis

PACKAGE = str(REPO / "textstream") + os.sep


class Tracer:
    def __init__(self) -> None:
        self.on = False
        self.order: list[str] = []
        self.moves = 0

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if not self.on or event != "call":
            return
        name = frame.f_code.co_filename
        if not name.startswith(PACKAGE):
            return
        here = name[len(PACKAGE) :]
        caller = frame.f_back
        while caller is not None and not caller.f_code.co_filename.startswith(PACKAGE):
            caller = caller.f_back
        if caller is not None and caller.f_code.co_filename != name:
            self.moves += 1
        if here not in self.order:
            self.order.append(here)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        redis_proc, url = start_redis(Path(tmp))
        env = service_env(url, "fake:2000", LOG_LEVEL="WARNING")
        worker = subprocess.Popen(
            [sys.executable, "-m", "textstream", "worker"],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.environ.update(env)
        from textstream.api.app import create_app
        from textstream.config import Settings

        port = free_port()
        config = uvicorn.Config(create_app(Settings()), port=port, log_config=None)
        server = uvicorn.Server(config)
        tracer = Tracer()
        threading.setprofile(tracer)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if httpx.get(base + "/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            ask = base + "/completion/Hello?max_new_tokens=8&use_cache=false"
            httpx.get(ask, timeout=30)  # warm: first-call imports and caches
            tracer.on = True
            with httpx.stream("GET", ask, timeout=30) as response:
                for _ in response.iter_lines():
                    pass
            time.sleep(0.2)  # the stream's cleanup after its last event
            tracer.on = False
        finally:
            server.should_exit = True
            thread.join(10)
            worker.terminate()
            worker.wait(10)
            redis_proc.terminate()
            redis_proc.wait(10)
    inside = [name for name in tracer.order if name.startswith("api/")]
    print(f"files one native request runs code in: {len(tracer.order)}, {len(inside)} in api/")
    print(f"moves from one file to another: {tracer.moves}")
    for name in tracer.order:
        print("  " + name)


if __name__ == "__main__":
    main()
