"""A thin JSON client for the few Kubernetes calls the operator makes.

It uses the `kubernetes` package only for configuration and authentication (kubeconfig or in-cluster),
and sends/receives plain dicts: the operator renders its objects as dicts and reads the fields it needs,
so the generated model classes would only add cost. Thread-safe (urllib3 pool); the reconciler runs in
a small thread pool.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote, urlencode

from kubernetes import client, config

from rlp_core.spec import API_GROUP, API_VERSION

log = logging.getLogger("rlp_operator.kube")

RUNS = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{{ns}}/rlpruns"
ALL_RUNS = f"/apis/{API_GROUP}/{API_VERSION}/rlpruns"  # every namespace (list only)
JOBS = "/apis/batch/v1/namespaces/{ns}/jobs"
PODS = "/api/v1/namespaces/{ns}/pods"
SERVICES = "/api/v1/namespaces/{ns}/services"
CONFIGMAPS = "/api/v1/namespaces/{ns}/configmaps"
EVENTS = "/api/v1/namespaces/{ns}/events"
SECRETS = "/api/v1/namespaces/{ns}/secrets"

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class KubeError(Exception):
    def __init__(self, status: int, reason: str, message: str = ""):
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


def load_config(kubeconfig: str | None = None) -> client.Configuration:
    """The current kubeconfig (KUBECONFIG or ~/.kube/config), or the in-cluster service account."""
    cfg = client.Configuration()
    try:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    except (config.ConfigException, FileNotFoundError, TypeError):
        config.load_incluster_config(client_configuration=cfg)
    return cfg


class Kube:
    def __init__(self, cfg: client.Configuration | None = None, *, pool_size: int = 16, timeout: float = 30.0):
        cfg = cfg or load_config()
        cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, pool_size)
        self.api = client.ApiClient(cfg)
        self.api.user_agent = "rlp-operator"
        self.timeout = timeout

    def close(self) -> None:
        self.api.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        _, url, headers, _, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            header_params=headers,
            auth_settings=["BearerToken"],
        )
        if query:
            url += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        # the REST layer serialises dicts/lists itself for every JSON content type (merge-patch included)
        resp = self.api.call_api(method, url, header_params=headers, body=body, _request_timeout=self.timeout)
        raw = resp.read()
        text = raw.decode() if isinstance(raw, bytes) else (raw or "")
        if resp.status >= 400:
            message = text
            reason = resp.reason or ""
            try:
                status = json.loads(text)
                message = status.get("message", text)
                reason = status.get("reason", reason)
            except ValueError:
                pass
            raise KubeError(resp.status, reason, message)
        return json.loads(text) if text else {}

    # ---- convenience -------------------------------------------------------------------------------
    def get(self, collection: str, ns: str, name: str, sub: str = "") -> dict[str, Any] | None:
        try:
            return self.request("GET", f"{collection.format(ns=ns)}/{quote(name)}{sub}")
        except KubeError as e:
            if e.not_found:
                return None
            raise

    def create(self, collection: str, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", collection.format(ns=ns), body=body)

    def merge_patch(self, collection: str, ns: str, name: str, patch: dict[str, Any], sub: str = "") -> dict[str, Any]:
        return self.request(
            "PATCH", f"{collection.format(ns=ns)}/{quote(name)}{sub}", body=patch, content_type=MERGE_PATCH
        )

    def json_patch(self, collection: str, ns: str, name: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        return self.request("PATCH", f"{collection.format(ns=ns)}/{quote(name)}", body=ops, content_type=JSON_PATCH)

    def replace(self, collection: str, ns: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("PUT", f"{collection.format(ns=ns)}/{quote(name)}", body=body)

    def delete(
        self, collection: str, ns: str, name: str, *, propagation: str = "Background", uid: str | None = None
    ) -> bool:
        """Delete (only the object with this `uid` when given); False when it was already gone."""
        options: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", f"{collection.format(ns=ns)}/{quote(name)}", body=options)
            return True
        except KubeError as e:
            if e.not_found:
                return False
            raise

    def list(
        self, collection: str, ns: str, *, labels: dict[str, str] | None = None, fields: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in (labels or {}).items()) or None
        field_selector = ",".join(f"{k}={v}" for k, v in (fields or {}).items()) or None
        items: list[dict[str, Any]] = []
        cont = None
        while True:
            query = {"labelSelector": selector, "fieldSelector": field_selector, "limit": 500, "continue": cont}
            page = self.request("GET", collection.format(ns=ns), query=query)
            items += page.get("items", [])
            cont = page.get("metadata", {}).get("continue")
            if not cont:
                return items
