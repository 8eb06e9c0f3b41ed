"""Which model a request goes to. One deployment may serve several: each worker
announces the model it serves (registry.py), and each model has a queue of its
own (keys.queue_scope), so a job waits only for its model's workers.

A request that names a model gets it if some worker serves it or has lately
(then it waits for one, with `"workers": 0` in its queued events), else 404
`model_not_found` (nothing queued). A request that names none gets, in order:
DEFAULT_MODEL; the one model live workers serve (several: 400, name one); with
no worker up, the one model served lately, else the configured one: the name
the workers will announce, SERVED_MODEL_NAME or the one MODEL_ID gives (a job
queued under MODEL_ID's name while the workers announced SERVED_MODEL_NAME
waited for nobody).

A worker that could not load MODEL_ID and serves MODEL_FALLBACK says so
(`fallback_for`): while no live worker serves the configured name itself,
requests for it go to the fallback, and the jobs queued for it before that
worker was up (a first run offline: the page asks while the model loads) are
moved to the fallback's queue by the housekeeping (janitor.py), within a second.

A job for a model that is neither configured nor served by a live worker waits
NO_WORKER_SECONDS at most; then the housekeeping ends it (`no_worker`,
janitor.py) instead of leaving it until JOB_TIMEOUT.
"""

from __future__ import annotations

from textstream.api.deps import Services
from textstream.api.errors import InvalidInputError, ServiceError
from textstream.config import Settings
from textstream.registry import KnownModel, known_models
from textstream.sources import served_name


class ModelNotFoundError(ServiceError, LookupError):
    status, error_type = 404, "model_not_found"

    def __init__(self, model: str, served: list[str]) -> None:
        names = ", ".join(served) or "none yet"
        shown = model if len(model) <= 100 else model[:100] + "…"  # not a 100 KB echo
        super().__init__(f"the model `{shown}` does not exist here; served: {names}")
        self.field = "model"


async def live_models(services: Services) -> list[str]:
    return await services.live_models.get(services.redis)


def configured_model(settings: Settings) -> str:
    """The name this deployment's own workers announce (worker/main.py does the same)."""
    return settings.served_model_name or served_name(settings.model_id)


async def all_models(services: Services) -> dict[str, KnownModel | None]:
    """Every model this deployment knows: served lately, plus the configured one
    (None: no worker has announced it yet)."""
    known: dict[str, KnownModel | None] = dict(await known_models(services.redis))
    configured = configured_model(services.settings)
    if configured and configured not in known:
        known[configured] = None
    return known


async def resolve_model(services: Services, requested: str | None) -> str:
    """The model a request goes to; a name whose worker serves a fallback in its
    place (MODEL_ID failed to load) goes to that fallback."""
    chosen = await _chosen_model(services, requested)
    await live_models(services)  # refreshes the aliases too
    return services.live_models.aliases.get(chosen, chosen)


async def _chosen_model(services: Services, requested: str | None) -> str:
    if requested:
        known = await all_models(services)
        if requested not in known:
            raise ModelNotFoundError(requested, await live_models(services))
        return requested
    if services.settings.default_model:
        return services.settings.default_model
    live = await live_models(services)
    if len(live) == 1:
        return live[0]
    if live:
        raise InvalidInputError("model", f"several models are served; name one of: {live}")
    lately = await known_models(services.redis)
    if len(lately) == 1:
        return next(iter(lately))
    return configured_model(services.settings)
