"""Whole-object GETs from S3-compatible stores through obstore (Rust's object_store): the response
body is received by obstore's own threads, without the GIL. s3fs (through aiobotocore and aiohttp)
receives every body in one Python event-loop thread, so a reader's GETs ran at the speed that
one thread got the GIL. Measured on the loopback moto server (its own process), 64 objects of
8 MB, 8 GETs in flight: s3fs 330-338 MB/s, obstore 707-804; with one other Python thread busy
(as a reader's threads are, between their GIL-free copies and checksums), s3fs 45-48 MB/s,
obstore 626-690.

Used by `Storage` for the bytes of objects (chunks, metadata); listing, writing and everything
else stay with fsspec. Only the storage options obstore can honour exactly are translated;
with any other (an s3fs-only setting), or without obstore, `getter_for` returns None and fsspec
reads as before. Credentials come from the options, else from botocore's own chain (environment,
profile, instance role), refreshed when they can expire. Like the fsspec read client, it does not
retry by itself: `Storage.get` retries with its ReadPolicy."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta

# options of s3fs that mean the same to obstore; any other makes us leave the reads to s3fs
_OPTIONS = {"endpoint_url", "key", "secret", "token", "anon", "client_kwargs", "profile"}
_CLIENT_KWARGS = {"endpoint_url", "region_name", "verify"}
_REFRESH = timedelta(minutes=5)  # how long refreshable credentials are taken to stay valid


class ObjectGetter:
    """GET whole objects by path (`bucket/key`): `get(path, timeout)` returns a buffer of the bytes,
    raises FileNotFoundError when there is none and PermissionError when access is refused; any
    other failure (a 5xx, a reset connection, a timeout) is raised for the caller to retry."""

    def __init__(self, config: dict, credentials) -> None:
        self._config, self._credentials = config, credentials
        self._stores: dict = {}
        self._lock = threading.Lock()

    def _store(self, bucket: str, timeout: float | None):
        from obstore.store import S3Store

        key = (bucket, timeout)
        with self._lock:
            store = self._stores.get(key)
            if store is None:
                client = dict(self._config["client_options"])
                # no timeout asked for: a day, not object_store's own default of 30 s (which would
                # fail, and retry in vain, any object slower than that to arrive)
                client["timeout"] = timedelta(seconds=float(timeout) if timeout else 86400.0)
                store = self._stores[key] = S3Store(bucket, config=self._config["config"], client_options=client,
                                                    retry_config={"max_retries": 0},
                                                    credential_provider=self._credentials)
        return store

    def get(self, path: str, timeout: float | None = None):
        import obstore
        from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

        bucket, _, key = path.lstrip("/").partition("/")
        try:
            return obstore.get(self._store(bucket, timeout), key).bytes()
        except (PermissionDeniedError, UnauthenticatedError) as exc:
            raise PermissionError(f"{path}: {exc}") from exc


def getter_for(protocol: str, options: dict) -> ObjectGetter | None:
    """An ObjectGetter for an s3:// store with these (s3fs) storage options, or None (see above)."""
    if protocol not in ("s3", "s3a") or os.environ.get("ACTSTORE_S3_CLIENT") == "fsspec":
        return None
    try:
        import obstore  # noqa: F401
    except ImportError:
        return None
    ck = dict(options.get("client_kwargs") or {})
    if set(options) - _OPTIONS or set(ck) - _CLIENT_KWARGS:
        return None
    import botocore.session

    session = botocore.session.Session(profile=options.get("profile"))
    endpoint = options.get("endpoint_url") or ck.get("endpoint_url") or _env_endpoint()
    region = ck.get("region_name") or session.get_config_variable("region") or "us-east-1"
    config: dict = {"region": region}
    client: dict = {"connect_timeout": timedelta(seconds=10)}
    if endpoint:
        config["endpoint"] = endpoint
        client["allow_http"] = endpoint.startswith("http://")
    if ck.get("verify") is False:
        client["allow_invalid_certificates"] = True
    provider = None
    if options.get("anon"):
        config["skip_signature"] = True
    elif options.get("key") and options.get("secret"):
        static = {"access_key_id": options["key"], "secret_access_key": options["secret"],
                  "token": options.get("token"), "expires_at": None}
        provider = lambda: static  # noqa: E731
    else:
        creds = session.get_credentials()
        if creds is None:
            return None  # nothing to sign with: s3fs says so in its own words
        provider = _BotocoreCredentials(creds)
    return ObjectGetter({"config": config, "client_options": client}, provider)


def _env_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


class _BotocoreCredentials:
    """botocore's credentials for obstore, asked for again before refreshable ones expire."""

    def __init__(self, creds) -> None:
        self.creds = creds
        self.refreshable = hasattr(creds, "refresh_needed")

    def __call__(self) -> dict:
        f = self.creds.get_frozen_credentials()
        return {"access_key_id": f.access_key, "secret_access_key": f.secret_key, "token": f.token,
                "expires_at": datetime.now(UTC) + _REFRESH if self.refreshable else None}
