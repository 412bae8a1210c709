"""The optional APIs a VLLMModel may ask for (KEDA's ScaledObject, autoscaling/v2 HPA, the Gateway API
Inference Extension's InferencePool): whether the cluster serves them, and whether the operator's
watches carry them.

How kopf treats a watched resource the cluster does not serve (kopf 1.x, ``reactor/observation.py``):
it logs "Unresolved resources cannot be served (try creating their CRDs)", starts no watch for it,
and its ``@kopf.index`` stays empty; nothing fails and nothing retries. Cluster-wide, kopf watches
CustomResourceDefinitions and re-scans an API group when one of its CRDs changes, so a CRD installed
later gets its watch within seconds. Namespaced (``settings.scanning.disabled``, no cluster-wide
reads) kopf scans the resources once, at start-up: an API installed later is not watched until the
operator restarts.

So the operator asks discovery itself (``GET /apis/<group>/<version>``: no object is read, allowed in
both modes), only for the APIs a model's spec wants, and keeps each answer ``recheck_seconds``: an
absent API costs one discovery request per group and interval, never a spin. What discovery found at
start-up is what kopf watches in namespaced mode; an API served now but not then is "unwatched", and
the plan says "restart the operator" instead of writing objects whose changes it could not see.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from . import kube

_log = logging.getLogger(__name__)

RECHECK_SECONDS = 30.0  # how long a discovery answer is kept
# The APIs a spec may ask for that a cluster may not serve (kopf watches them when it does).
OPTIONAL_APIS = (kube.SCALEDOBJECTS, kube.HPAS, kube.INFERENCEPOOLS)


class Discovery(Protocol):
    async def served(self, resource: kube.Resource) -> bool: ...


class OptionalApis:
    """Discovery of ``OPTIONAL_APIS``, cached; ``fixed_watches``: kopf scans resources only at start-up."""

    def __init__(
        self,
        client: Discovery,
        *,
        fixed_watches: bool,
        recheck_seconds: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._discovery = client
        self._fixed = fixed_watches
        self._recheck = recheck_seconds  # None: RECHECK_SECONDS (read at each use; tests shorten it)
        self._clock = clock or (lambda: asyncio.get_running_loop().time())
        self._known: dict[str, tuple[bool, float]] = {}  # plural -> (served, when asked)
        self._at_start: frozenset[str] | None = None  # plurals served when the watches were set up

    async def start(self) -> None:
        """Record what the cluster serves now, as kopf's own scan at start-up sees it."""
        served: set[str] = set()
        for resource in OPTIONAL_APIS:
            try:
                if await self._ask(resource):
                    served.add(resource.plural)
            except kube.ApiError as exc:  # unknown: assume kopf found it (the plan then writes as usual)
                _log.warning(f"discovery of {resource.api_version} {resource.plural} failed at start-up: {exc}")
                served.add(resource.plural)
        self._at_start = frozenset(served)
        missing = [r.plural for r in OPTIONAL_APIS if r.plural not in served]
        if missing:
            _log.info(f"optional APIs not served by this cluster: {', '.join(missing)} (spec.autoscaling / "
                      "spec.routing of a model needing one report it in their conditions)")  # fmt: skip

    async def _ask(self, resource: kube.Resource) -> bool:
        served = await self._discovery.served(resource)
        self._known[resource.plural] = (served, self._clock())
        return served

    async def served(self, resource: kube.Resource) -> bool:
        """Whether the cluster serves ``resource``, at most ``recheck_seconds`` old. Raises kube.ApiError."""
        known = self._known.get(resource.plural)
        recheck = RECHECK_SECONDS if self._recheck is None else self._recheck
        if known is not None and self._clock() - known[1] < recheck:
            return known[0]
        return await self._ask(resource)

    async def recheck(self, resource: kube.Resource) -> bool:
        """Ask discovery again now (a write of ``resource`` was answered 404)."""
        return await self._ask(resource)

    def watched(self, resource: kube.Resource) -> bool:
        """Whether kopf's watch carries ``resource`` given that the cluster serves it."""
        return not self._fixed or self._at_start is None or resource.plural in self._at_start

    async def check(self, resources: Iterable[kube.Resource]) -> tuple[frozenset[str], frozenset[str]]:
        """The plurals of ``resources`` the cluster does not serve, and those it serves that are not watched."""
        missing: set[str] = set()
        unwatched: set[str] = set()
        for resource in resources:
            if not await self.served(resource):
                missing.add(resource.plural)
            elif not self.watched(resource):
                unwatched.add(resource.plural)
        return frozenset(missing), frozenset(unwatched)
