"""Every Kubernetes API call the operator makes, in one place, async end to end.

A small client over aiohttp (kopf's own HTTP library) speaking raw JSON dicts, so the pure builders'
output goes to the API unchanged and nothing blocks the event loop. It authenticates with the same
``kopf.ConnectionInfo`` that kopf's login produces (in-cluster service account or kubeconfig), and
logs in again once when the API answers 401 (rotated tokens).

Children are written with server-side apply (field manager from ``Config.field_manager``, force), so
the operator owns only the fields it sets and never fights GitOps tools over the others.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import kopf

from . import metrics

JSON = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"  # JSON is valid YAML: the API server accepts it

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resource:
    """A namespaced API resource: where its objects live on the API server."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        parts = [root]
        if namespace is not None:
            parts.append(f"namespaces/{quote(namespace, safe='')}")
        parts.append(self.plural)
        if name is not None:
            parts.append(quote(name, safe=""))
            if subresource:
                parts.append(subresource)
        return "/".join(parts)


VLLMMODELS = Resource("vllm-operator.io", "v1alpha1", "vllmmodels", "VLLMModel")
PVCS = Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
SERVICES = Resource("", "v1", "services", "Service")
PODS = Resource("", "v1", "pods", "Pod")
JOBS = Resource("batch", "v1", "jobs", "Job")
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment")
STATEFULSETS = Resource("apps", "v1", "statefulsets", "StatefulSet")  # cache.sharing PerReplica
PDBS = Resource("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget")
NETWORKPOLICIES = Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy")
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")  # only the operator's own: the adapters file
# Optional APIs (spec.autoscaling, spec.routing): their CRDs may be missing from a cluster.
SCALEDOBJECTS = Resource("keda.sh", "v1alpha1", "scaledobjects", "ScaledObject")
HPAS = Resource("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler")
INFERENCEPOOLS = Resource("inference.networking.k8s.io", "v1", "inferencepools", "InferencePool")

EVENTS = Resource("", "v1", "events", "Event")

_BY_KIND = {(r.api_version, r.kind): r for r in (VLLMMODELS, PVCS, SERVICES, PODS, JOBS, DEPLOYMENTS,
                                                 STATEFULSETS, PDBS, NETWORKPOLICIES,
                                                 CONFIGMAPS, SCALEDOBJECTS, HPAS, INFERENCEPOOLS)}


def resource_of(obj: Mapping[str, Any]) -> Resource:
    """The resource of a manifest, from its apiVersion and kind."""
    key = (str(obj.get("apiVersion", "")), str(obj.get("kind", "")))
    try:
        return _BY_KIND[key]
    except KeyError:
        raise ValueError(f"the operator does not write {key[1]} ({key[0]}) objects") from None


class ApiError(Exception):
    """A failed API call, with the Kubernetes Status' code, reason and message."""

    def __init__(self, status: int, reason: str, message: str, *, method: str = "", path: str = "") -> None:
        super().__init__(f"{method} {path}: {status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def retryable(self) -> bool:
        """Worth retrying as is: conflicts, throttling, server-side and gateway errors."""
        return self.status in (409, 429) or self.status >= 500


Login = Callable[[], Awaitable[kopf.ConnectionInfo]]


async def login_from_environment() -> kopf.ConnectionInfo:
    """In-cluster service account, else kubeconfig: what ``kopf.login_via_client`` finds."""
    import logging

    def _login() -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(logger=logging.getLogger(__name__), settings=kopf.OperatorSettings())

    info = await asyncio.to_thread(_login)
    if info is None:
        raise kopf.LoginError("no Kubernetes credentials: neither in-cluster nor a kubeconfig")
    return info


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if not info.server.startswith("https"):
        return False
    if info.insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        cadata = info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data
        ctx = ssl.create_default_context(cafile=info.ca_path, cadata=cadata)
    cert, key = info.certificate_path, info.private_key_path
    # ssl needs files; kubeconfigs may carry inline data.
    with tempfile.TemporaryDirectory() as tmp:
        if info.certificate_data:
            cert = f"{tmp}/cert.pem"
            _write(cert, info.certificate_data)
        if info.private_key_data:
            key = f"{tmp}/key.pem"
            _write(key, info.private_key_data)
        if cert:
            ctx.load_cert_chain(cert, key)
    return ctx


def _write(path: str, data: str | bytes) -> None:
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _headers(info: kopf.ConnectionInfo) -> dict[str, str]:
    if info.token:
        return {"Authorization": f"{info.scheme or 'Bearer'} {info.token}"}
    if info.username and info.password:
        return {"Authorization": aiohttp.BasicAuth(info.username, info.password).encode()}
    return {}


class KubeClient:
    """The operator's API client: get, list, server-side apply, status patch, delete."""

    def __init__(self, login: Login, *, field_manager: str = "vllm-operator", timeout: float = 30.0) -> None:
        self._login = login
        self._field_manager = field_manager
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._server = ""
        self._lock = asyncio.Lock()

    async def _connect(self, *, again: bool = False) -> aiohttp.ClientSession:
        async with self._lock:
            if self._session is not None and not again:
                return self._session
            info = await self._login()
            if self._session is not None:
                await self._session.close()
            self._server = info.server.rstrip("/")
            connector = aiohttp.TCPConnector(ssl=_ssl_context(info))
            self._session = aiohttp.ClientSession(
                connector=connector, headers=_headers(info), timeout=self._timeout
            )
            return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> JSON:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        metrics.count_request(method, path, content_type)
        url_path = path + ("?" + urlencode(params) if params else "")
        for attempt in (1, 2):
            session = await self._connect(again=attempt == 2)
            try:
                async with session.request(method, self._server + url_path, data=data, headers=headers) as resp:
                    text = await resp.text()
                    status = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise ApiError(503, "ConnectionError", f"{type(exc).__name__}: {exc}", method=method, path=path) from exc
            if status == 401 and attempt == 1:
                continue  # rotated credentials: log in again once
            break
        try:
            payload = json.loads(text) if text else {}
        except ValueError:
            payload = {"message": text[:500]}
        if status >= 400:
            if not isinstance(payload, dict):
                payload = {}
            raise ApiError(
                status,
                str(payload.get("reason") or "Error"),
                str(payload.get("message") or text[:500]),
                method=method,
                path=path,
            )
        return payload if isinstance(payload, dict) else {}

    async def get(self, resource: Resource, namespace: str, name: str) -> JSON | None:
        """The object, or None when it does not exist."""
        try:
            return await self._request("GET", resource.path(namespace, name))
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    async def list(self, resource: Resource, namespace: str | None, labels: Mapping[str, str], *,
                   page_size: int = 500) -> list[JSON]:  # fmt: skip
        """Objects in ``namespace`` (None: all namespaces) carrying all ``labels``, read page by page
        (``limit``/``continue``) so a large list never arrives as one response.

        The selector also goes to the server; filtering again here keeps the result right even where a
        server (or an emulator) ignores it.
        """
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        items: list[JSON] = []
        token = ""
        while True:
            params = {"limit": str(page_size)}
            if selector:
                params["labelSelector"] = selector
            if token:
                params["continue"] = token
            data = await self._request("GET", resource.path(namespace), params=params)
            items += [obj for obj in data.get("items") or [] if isinstance(obj, dict) and has_labels(obj, labels)]
            token = str((data.get("metadata") or {}).get("continue") or "")
            if not token:
                return items

    async def apply(self, obj: Mapping[str, Any]) -> JSON:
        """Server-side apply ``obj`` (create or bring in line), owning only the fields it sets."""
        resource = resource_of(obj)
        meta = obj["metadata"]
        return await self._request(
            "PATCH",
            resource.path(meta["namespace"], meta["name"]),
            params={"fieldManager": self._field_manager, "force": "true"},
            body=obj,
            content_type=APPLY_PATCH,
        )

    async def patch_status(self, resource: Resource, namespace: str, name: str, status: Mapping[str, Any]) -> JSON:
        """Merge-patch the status subresource (None values remove keys; lists are replaced)."""
        return await self._request(
            "PATCH",
            resource.path(namespace, name, "status"),
            body={"status": status},
            content_type=MERGE_PATCH,
        )

    async def post_event(self, regarding: Mapping[str, Any], event: Any) -> None:
        """Post a core/v1 Event about ``regarding`` (``event`` has type, reason, message). Best effort:
        an Event that cannot be posted is logged, never raised into a reconcile."""
        meta = regarding.get("metadata") or {}
        namespace = str(meta.get("namespace") or "default")
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": regarding.get("apiVersion"), "kind": regarding.get("kind"),
                "name": meta.get("name"), "namespace": namespace, "uid": meta.get("uid"),
            },  # fmt: skip
            "type": event.type,
            "reason": event.reason,
            "message": str(event.message)[:1024],
            "source": {"component": self._field_manager},
            "reportingComponent": self._field_manager,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._request("POST", EVENTS.path(namespace), body=body)
        except ApiError as exc:
            _log.warning(f"cannot post Event {event.reason} for {namespace}/{meta.get('name')}: {exc}")

    async def served(self, resource: Resource) -> bool:
        """Whether the API server serves ``resource`` (discovery of its group/version: no object is read)."""
        root = f"/apis/{resource.group}/{resource.version}" if resource.group else f"/api/{resource.version}"
        try:
            found = await self._request("GET", root)
        except ApiError as exc:
            if exc.not_found:
                return False
            raise
        return any(isinstance(r, dict) and r.get("name") == resource.plural for r in found.get("resources") or [])

    async def delete(self, resource: Resource, namespace: str, name: str, *, propagation: str = "Background") -> bool:
        """Delete an object and (by the API's garbage collector) its dependents; False if it was gone."""
        try:
            await self._request(
                "DELETE",
                resource.path(namespace, name),
                body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation},
            )
        except ApiError as exc:
            if exc.not_found:
                return False
            raise
        return True


def has_labels(obj: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    found = (obj.get("metadata") or {}).get("labels") or {}
    return all(found.get(k) == v for k, v in labels.items())


def slim(body: Mapping[str, Any]) -> JSON:
    """``body`` without ``metadata.managedFields``: often its largest part, and nothing the planner reads."""
    meta = body.get("metadata") or {}
    if "managedFields" not in meta:
        return dict(body)
    return {**body, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
