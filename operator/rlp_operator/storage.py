"""Store access with the run's own credentials: the operator verifies phase outputs as the run's pods see them."""

from __future__ import annotations

import base64
import threading
import time

from rlp_core.manifest import Manifest, phase_prefix, verify_manifest
from rlp_core.provenance import Provenance
from rlp_core.spec import RLPRun
from rlp_core.store import Store
from rlp_operator import workload as wl
from rlp_operator.kube import SECRETS, Kube


class StorageCredentialsError(RuntimeError):
    """The Secret named by `storage.secretRef` is missing or lacks a key."""


class Stores:
    """Opens a run's store with the credentials of the Secret its spec names (`storage.secretRef`).

    The operator reads that Secret (`get` only, never list/watch) so it verifies manifests with exactly the
    access the run's pods have; with no secretRef it uses its own environment (boto3's default chain).
    Secret values stay in memory: never logged, never written to status, events or ConfigMaps.
    """

    def __init__(self, kube: Kube, cache_seconds: float = 300.0):
        self.kube = kube
        self.cache_seconds = cache_seconds
        self._cache: dict[tuple, tuple[float, Store]] = {}
        self._lock = threading.Lock()

    def open(self, run: RLPRun, uri: str | None = None) -> Store:
        """The run's storage root, or the store of another URI (a data file's or model's parent) opened with
        the same endpoint and credentials, as the run's pods open it."""
        st = run.spec.storage
        ns = run.metadata.namespace
        uri = uri or st.uri
        key = (ns, uri, st.endpoint, st.region, st.secret_ref.name if st.secret_ref else None)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit and now - hit[0] < self.cache_seconds:
                return hit[1]
        access = secret = None
        if st.secret_ref:
            obj = self.kube.get(SECRETS, ns, st.secret_ref.name)
            if obj is None:
                raise StorageCredentialsError(
                    f"storage.secretRef: Secret {ns}/{st.secret_ref.name} not found; create it with keys "
                    f"{' and '.join(wl.SECRET_KEYS)}"
                )
            data = obj.get("data") or {}
            missing = [k for k in wl.SECRET_KEYS if k not in data]
            if missing:
                raise StorageCredentialsError(
                    f"storage.secretRef: Secret {ns}/{st.secret_ref.name} lacks key(s) {', '.join(missing)}"
                )
            access, secret = (base64.b64decode(data[k]).decode() for k in wl.SECRET_KEYS)
        # no long retries inside a reconcile: an unavailable store is reported and looked at again later
        store = Store.from_uri(uri, endpoint=st.endpoint, region=st.region, access_key=access, secret_key=secret,
                               timeout=st.read_timeout_seconds, connect_timeout=st.connect_timeout_seconds,
                               retry_seconds=0)
        with self._lock:
            self._cache[key] = (now, store)
        return store

    def phase(self, run: RLPRun, round_: int, phase: str) -> Store:
        return self.open(run).child(phase_prefix(run.metadata.namespace, run.metadata.name, round_, phase))

    def verify(self, run: RLPRun, round_: int, phase: str) -> tuple[Manifest | None, str]:
        """The phase's manifest when its output is complete and was made for this spec and these inputs.

        An output made under other spec fields (a run re-created under the same name) is not complete:
        the phase's pod then fails naming the changed fields. Manifests without a fingerprint (written
        before rlp recorded provenance) are taken as they are.
        """
        store = self.phase(run, round_, phase)
        manifest = verify_manifest(store)
        if manifest is not None and manifest.fingerprint is not None:
            expected = Provenance(run, self.open(run)).locate(round_, phase).fingerprint
            if expected is not None and expected != manifest.fingerprint:
                manifest = None
        return manifest, store.url() + "/"

    def delete_run_outputs(self, run: RLPRun) -> int:
        return self.open(run).child(run.metadata.namespace, run.metadata.name).delete_prefix("")
