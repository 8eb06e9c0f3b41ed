"""The page and the operator's view: `/` and `/health` (open), `/ready`, `/workers`
and `/metrics` (behind the API key when one is set).

No `from __future__ import annotations`: FastAPI reads these signatures at run time.
"""

import asyncio
import time
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from starlette.exceptions import HTTPException as StarletteHTTPException

from textstream.api.deps import Services, services_of
from textstream.api.edge import authorize
from textstream.api.errors import RETRY_AFTER
from textstream.api.metrics import render
from textstream.api.models import all_models
from textstream.api.queue import queue_length
from textstream.connections import UNREACHABLE
from textstream.registry import WorkerInfo, live_workers
from textstream.resources import package_dir

ASSET_CACHING = {"Cache-Control": "public, max-age=86400"}

PAGE = files("textstream.api").joinpath("static/index.html").read_text(encoding="utf-8")


#: Swagger UI and ReDoc, served from the `fastapi-offline` package (MIT): /docs
#: works with no internet, where FastAPI's defaults load them from a CDN.
DOCS_ASSETS = package_dir("fastapi_offline")
DOCS_FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}


def add_docs(app: FastAPI, *, open_to_all: bool) -> None:
    """/openapi.json, /docs and /redoc: open, or behind the API key (DOCS). Their
    scripts and styles (no secrets in them) are always served, from this process."""
    dependencies = [] if open_to_all else [Depends(authorize)]

    @app.get("/docs-assets/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        if name not in DOCS_FILES or DOCS_ASSETS is None:
            raise StarletteHTTPException(404, "no such file")
        path = DOCS_ASSETS / "static" / name
        return FileResponse(path, media_type=DOCS_FILES[name], headers=ASSET_CACHING)

    @app.get("/openapi.json", include_in_schema=False, dependencies=dependencies)
    async def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=dependencies)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="textstream API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False, dependencies=dependencies)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="textstream API",
            redoc_js_url="/docs-assets/redoc.standalone.js",
            redoc_favicon_url="/docs-assets/favicon.png",
            with_google_fonts=False,
        )


public = APIRouter()
router = APIRouter(dependencies=[Depends(authorize)])


@public.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    """The chat page: plain HTML/CSS/JS shipped in the package, no build step, no CDN."""
    return HTMLResponse(PAGE)


async def workers_or_none(services: Services) -> tuple[bool, list[WorkerInfo]]:
    """(both Redis roles usable, the live workers). The workers come from the
    queue's Redis whatever the streams' store says; a cluster is usable when it
    serves all its slots (a node answers PING while the cluster is down)."""
    timeout = services.settings.redis_timeout
    try:
        async with asyncio.timeout(timeout):
            await services.redis.ping()
            workers = await live_workers(services.redis)
    except UNREACHABLE:
        return False, []
    streams = services.jobs.client
    try:
        async with asyncio.timeout(timeout):
            if isinstance(streams, AsyncRedisCluster):
                info = await streams.cluster_info()
                return info.get("cluster_state") == "ok", workers
            if streams is not services.redis:
                await streams.ping()  # the streams' own Redis
    except UNREACHABLE:
        return False, workers
    return True, workers


@public.api_route("/health", methods=["GET", "HEAD"])  # HEAD: probes that send it
async def health(request: Request) -> JSONResponse:
    """Liveness (always 200, cheap), plus what is known: Redis, live workers' models."""
    services = services_of(request)
    redis_ok, workers = await workers_or_none(services)
    models = sorted({w.model for w in workers})
    body: dict[str, Any] = {
        "status": "ok",
        "redis": redis_ok,
        "workers": len(workers),
        "model": models[0] if len(models) == 1 else (models or None),
        "models": models,
        "auth": services.guard.enabled,
    }
    return JSONResponse(body)


@router.api_route("/ready", methods=["GET", "HEAD"])
async def ready(request: Request) -> JSONResponse:
    """200 only when Redis answers and at least one live worker has its model loaded."""
    redis_ok, workers = await workers_or_none(services_of(request))
    reason = None if redis_ok else "Redis does not answer"
    if redis_ok and not workers:
        reason = "no live worker has a model loaded"
    body = {
        "ready": reason is None,
        "reason": reason,
        "workers": len(workers),
        "models": sorted({w.model for w in workers}),
    }
    if reason is None:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": RETRY_AFTER})


@router.get("/workers")
async def workers(request: Request) -> dict[str, Any]:
    """Live workers: id, host, model, device, busy/free slots, last heartbeat."""
    services = services_of(request)
    live = await live_workers(services.redis)
    now = time.time()
    return {
        "workers": [
            {
                "id": w.worker_id,
                "host": w.host,
                "pid": w.pid,
                "model": w.model,
                "device": w.device,
                "slots": w.slots,
                "busy": w.busy,
                "free": max(0, w.slots - w.busy),
                "batching": w.batching,
                "peak_batch": w.peak_batch,
                "last_heartbeat_seconds_ago": round(now - w.heartbeat_at, 3),
                "model_load_seconds": w.load_seconds,
                "last_tokens_per_second": w.last_tokens_per_s,
            }
            for w in live
        ]
    }


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format, the same from every API process (figures live in Redis)."""
    services = services_of(request)
    _, live = await workers_or_none(services)
    queues = {
        model: await queue_length(services.redis, model) for model in await all_models(services)
    }
    body = await render(services.redis, live, queues)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
