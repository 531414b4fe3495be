"""Where a db lives: a local folder or an object-store prefix (s3://, gs://, az://), one code path.

LanceDB opens the tables with the location's ``storage_options``. The small files beside them (the
manifest, run reports and logs, the writer lock) go through obstore, the Python binding of the Rust
``object_store`` crate that LanceDB itself builds on: it speaks to a local folder and to every object
store with one API, and it has the conditional put (``If-None-Match: *``) that the writer lock needs and
that ``pyarrow.fs`` lacks. Sources are read with ``pyarrow.fs`` (see ``filesystem``) because Ray Data's
readers take one.

Credentials never appear here: they come from the environment (``AWS_ACCESS_KEY_ID``... or an instance
profile, ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_ACCOUNT_KEY``...), which LanceDB and
obstore read, and pyarrow too except for Azure, whose filesystem ``filesystem`` builds from the same
variables. What may appear (endpoint, region, allow_http) comes from the ``storage:`` config section or
from ``AWS_ENDPOINT_URL`` / ``AWS_REGION``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "az": "az"}  # spelling -> the one used


class LocationError(ValueError):
    """A db location that cannot be used: a bad URI, a missing bucket, refused credentials, no endpoint."""


def is_uri(text: str | os.PathLike[str]) -> bool:
    """Whether ``text`` names an object-store location (``s3://...``), not a local path."""
    return urlsplit(str(text)).scheme.lower() in SCHEMES


@dataclass(frozen=True)
class Location:
    """A local folder or an object-store prefix, with the options to open it; picklable, so Ray
    tasks and Serve replicas on other nodes open the same place the same way.

    Attributes:
        uri: an absolute local path, or ``scheme://bucket/prefix`` (no trailing slash).
        options: LanceDB ``storage_options`` (endpoint, region, allow_http...), never credentials.
    """

    uri: str
    options: tuple[tuple[str, str], ...] = field(default=())

    @property
    def local(self) -> bool:
        return not is_uri(self.uri)

    @property
    def path(self) -> Path:
        """The local folder (local locations only)."""
        if not self.local:
            raise LocationError(f"{self.uri} is not a local path")
        return Path(self.uri)

    @property
    def storage_options(self) -> dict[str, str]:
        return dict(self.options)

    def join(self, *parts: str) -> Location:
        return Location("/".join([self.uri.rstrip("/"), *(p.strip("/") for p in parts)]), self.options)

    def __str__(self) -> str:
        return self.uri

    def connect(self, **kwargs: Any) -> Any:
        """A LanceDB connection to this location."""
        import lancedb

        if self.local:
            return lancedb.connect(self.uri, **kwargs)
        return lancedb.connect(self.uri, storage_options=self.storage_options, **kwargs)

    # --- small files (manifest, reports, logs, lock objects) ---

    def read_bytes(self, name: str) -> bytes | None:
        """The file ``name`` under this location; None if there is none."""
        import obstore

        if self._absent():
            return None
        try:
            with _failing(self, "read"):
                return bytes(obstore.get(_store(self), name).bytes())
        except FileNotFoundError:
            return None

    def read_json(self, name: str) -> Any:
        data = self.read_bytes(name)
        return None if data is None else json.loads(data)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` whole: readers see the old file or the new one, never part of one."""
        import obstore

        with _failing(self, "write to", missing_is_error=True):
            obstore.put(_store(self, write=True), name, data)  # local: a temporary file renamed into place

    def create(self, name: str, data: bytes) -> bool:
        """Write ``name`` only if no such file exists (a conditional put); whether this call made it.

        object_store turns a refused create-only put into AlreadyExistsError (S3's 412, Azurite's 409
        BlobAlreadyExists); a 412 passed on as PreconditionError (Azure's own answer to
        ``If-None-Match: *``) means the same: the file exists."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            with _failing(self, "write to", missing_is_error=True):
                obstore.put(_store(self, write=True), name, data, mode="create")
        except (AlreadyExistsError, PreconditionError):
            return False
        return True

    def list(self, prefix: str = "") -> list[dict[str, Any]]:
        """Files under ``prefix`` (recursively), each ``{path, size, last_modified}``, path relative
        to this location."""
        import obstore

        if self._absent():
            return []
        with _failing(self, "list"):
            return [obj for batch in obstore.list(_store(self), prefix or None) for obj in batch]

    def folders(self, prefix: str = "") -> list[str]:
        """The names of the folders directly under ``prefix``."""
        import obstore

        if self._absent():
            return []
        with _failing(self, "list"):
            listed = obstore.list_with_delimiter(_store(self), prefix or None)
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listed["common_prefixes"])

    def exists(self, name: str) -> bool:
        import obstore

        if self._absent():
            return False
        try:
            with _failing(self, "read"):
                obstore.head(_store(self), name)
        except FileNotFoundError:
            return False
        return True

    def delete(self, name: str) -> None:
        import obstore

        with contextlib.suppress(FileNotFoundError), _failing(self, "delete in"):
            obstore.delete(_store(self), name)

    def delete_tree(self, prefix: str) -> int:
        """Delete every file under ``prefix``; how many there were."""
        import obstore

        paths = [obj["path"] for obj in self.list(prefix.rstrip("/") + "/")]
        for start in range(0, len(paths), 1000):
            with _failing(self, "delete in"):
                obstore.delete(_store(self), paths[start : start + 1000])
        if self.local:  # object stores have no empty folders; a local disk keeps them
            _remove_empty_dirs(self.path / prefix)
            for parent in (self.path / prefix).parents:  # and the folders it emptied, up to the db
                if parent == self.path or not parent.is_relative_to(self.path):
                    break
                with contextlib.suppress(OSError):
                    parent.rmdir()
        return len(paths)

    def _absent(self) -> bool:
        # A local db that does not exist yet reads as empty, and reading it never creates it.
        return self.local and not self.path.is_dir()

    def check(self) -> None:
        """Reach the location once (list its prefix), or raise LocationError with the reason in one line:
        a bucket that does not exist, refused credentials, an endpoint that does not answer."""
        if self.local:
            return
        try:
            import obstore

            next(iter(obstore.list(_store(self, quick=True), None, chunk_size=1)), None)
        except Exception as exc:  # obstore raises GenericError etc.; the message names the cause
            raise LocationError(f"Cannot reach {self.uri}: {error_reason(exc, self.uri)}") from exc

    def filesystem(self) -> tuple[Any, str]:
        """A ``pyarrow.fs`` filesystem and the path in it (for Ray Data's readers)."""
        import pyarrow.fs as pafs

        if self.local:
            return pafs.LocalFileSystem(), self.uri
        parts = urlsplit(self.uri)
        scheme, path = SCHEMES[parts.scheme.lower()], parts.netloc + parts.path
        opts = self.storage_options
        if scheme == "s3":
            endpoint = opts.get("endpoint")
            kwargs: dict[str, Any] = {"region": opts.get("region")} if opts.get("region") else {}
            if endpoint:
                ep = urlsplit(endpoint)
                kwargs.update(endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "https")
            return pafs.S3FileSystem(**kwargs), path
        if scheme == "az":  # az://container/path
            return _azure_filesystem(self.uri, opts), path
        # gs://: Google's libraries and emulators agree on STORAGE_EMULATOR_HOST (anonymous, http).
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        endpoint = opts.get("endpoint") or emulator
        if endpoint:
            parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
            return pafs.GcsFileSystem(
                anonymous=bool(emulator), scheme=parts.scheme, endpoint_override=parts.netloc
            ), path
        return pafs.GcsFileSystem(), path


def location(db: str | os.PathLike[str] | Location, storage: Any = None) -> Location:
    """The Location of a db (or a source) given as a path, a URI or a Location.

    Args:
        db: a local path, ``s3://bucket/prefix`` (gs://, az://), or a Location (returned as it is).
        storage: the config's ``storage:`` section (endpoint, region, allow_http, options); None: the
            environment only (AWS_ENDPOINT_URL, AWS_REGION).
    """
    if isinstance(db, Location):
        return db
    text = str(db)
    if text.lower().startswith("file://"):
        text = text[len("file://") :]
    scheme_typed = urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme_typed and scheme_typed not in SCHEMES:
        raise LocationError(
            f"{text!r}: unsupported scheme {scheme_typed!r}. Supported: s3://, gs://, az://, a path."
        )
    if not is_uri(text):
        # A URI typed where a path was expected arrives as ".../s3:/bucket/db": refuse to create that.
        if any(p.lower().rstrip(":") in SCHEMES for p in Path(text).parts if p.endswith(":")):
            raise LocationError(f"{text!r} looks like a mangled URI; write it as s3://bucket/prefix.")
        return Location(str(Path(text).expanduser().resolve()))
    parts = urlsplit(text)
    scheme = SCHEMES[parts.scheme.lower()]
    if not parts.netloc:
        raise LocationError(f"{text!r} names no bucket; write it as {scheme}://bucket/prefix.")
    if parts.query or parts.fragment:
        raise LocationError(
            f"{text!r}: put endpoint and region in the config's storage: section, not the URI."
        )
    uri = f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"  # gcs:// -> gs://, s3a:// -> s3://
    return Location(uri, tuple(sorted(_options(scheme, storage).items())))


def _azure_filesystem(uri: str, opts: dict[str, str]) -> Any:
    """pyarrow's AzureFileSystem from the variables LanceDB and obstore read (the Rust object_store
    crate's): the account and key, and for the emulator (``AZURE_STORAGE_USE_EMULATOR=true``) the blob
    URL of ``AZURITE_BLOB_STORAGE_URL``, as theirs default to it. pyarrow reads none of these itself: left
    alone it asks DefaultAzureCredential for a token, and it checks for a hierarchical namespace on the
    account's public ``dfs`` host, so both hosts are pointed at the emulator or the configured endpoint."""
    import pyarrow.fs as pafs

    def setting(name: str) -> str | None:
        return (
            opts.get(name)
            or opts.get(f"azure_storage_{name}")
            or os.environ.get(f"AZURE_STORAGE_{name.upper()}")
        )

    account = setting("account_name")
    if not account:
        raise LocationError(f"{uri}: name the storage account (AZURE_STORAGE_ACCOUNT_NAME).")
    kwargs: dict[str, Any] = {"account_name": account}
    if key := setting("account_key"):
        kwargs["account_key"] = key
    endpoint = opts.get("endpoint") or opts.get("azure_storage_endpoint")
    if str(setting("use_emulator")).lower() == "true":
        endpoint = os.environ.get("AZURITE_BLOB_STORAGE_URL") or "http://127.0.0.1:10000"
    if endpoint:
        parts = urlsplit(endpoint)
        kwargs.update(
            blob_storage_authority=parts.netloc,
            blob_storage_scheme=parts.scheme,
            dfs_storage_authority=parts.netloc,
            dfs_storage_scheme=parts.scheme,
        )
    return pafs.AzureFileSystem(**kwargs)


def _options(scheme: str, storage: Any) -> dict[str, str]:
    opts: dict[str, str] = {}
    endpoint = getattr(storage, "endpoint", None)
    if scheme == "s3":
        endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = (
            getattr(storage, "region", None)
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
        )
        if endpoint:
            opts["endpoint"] = endpoint
        if region:
            opts["region"] = region
        allow_http = getattr(storage, "allow_http", None)
        if allow_http is None:
            allow_http = bool(endpoint and endpoint.startswith("http://"))
        if allow_http:
            opts["allow_http"] = "true"
    elif endpoint:
        opts["endpoint"] = endpoint
    opts.update(getattr(storage, "options", None) or {})
    return opts


_CLIENT_KEYS = {"allow_http", "timeout", "connect_timeout", "allow_invalid_certificates", "proxy_url"}


def _store(loc: Location, quick: bool = False, write: bool = False) -> Any:
    if write and loc.local:
        loc.path.mkdir(parents=True, exist_ok=True)
    # Stores read credentials from the environment when made: one per environment, so that a
    # process whose credentials change (rotated keys, tests) does not keep the old ones.
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "AZURE_"))))
    return _cached_store(loc, quick, env)


@functools.lru_cache(maxsize=64)
def _cached_store(loc: Location, quick: bool, env: tuple[tuple[str, str], ...]) -> Any:
    from obstore.store import LocalStore, from_url

    if loc.local:
        return LocalStore(loc.uri)
    opts = loc.storage_options
    client: dict[str, Any] = {k: opts[k] for k in _CLIENT_KEYS & opts.keys()}
    if "allow_http" in client:
        client["allow_http"] = str(client["allow_http"]).lower() == "true"
    config = {k: v for k, v in opts.items() if k not in _CLIENT_KEYS}
    retry: dict[str, Any] | None = None
    if quick:  # the first contact: an endpoint that does not answer is an error in seconds, not minutes
        client.setdefault("connect_timeout", "3s")
        client.setdefault("timeout", "15s")
        retry = {
            "max_retries": 2,
            "retry_timeout": timedelta(seconds=8),
            "backoff": {
                "init_backoff": timedelta(milliseconds=200),
                "max_backoff": timedelta(seconds=2),
                "base": 2,
            },
        }
    return from_url(loc.uri, config=config or None, client_options=client or None, retry_config=retry)


@contextlib.contextmanager
def _failing(loc: Location, what: str, missing_is_error: bool = False) -> Iterator[None]:
    """Turn an object store's error (refused credentials, no such bucket, no answer) into one
    LocationError line; a missing file stays FileNotFoundError for the caller to handle, except on a
    write (``missing_is_error``), where only a missing container (Azure answers 404) can cause it."""
    from obstore.exceptions import AlreadyExistsError, BaseError, PreconditionError

    try:
        yield
    except FileNotFoundError as exc:
        if missing_is_error and not loc.local:
            raise LocationError(f"Cannot {what} {loc.uri}: {error_reason(exc, loc.uri)}") from exc
        raise
    except (AlreadyExistsError, PreconditionError):
        raise
    except (BaseError, PermissionError, ConnectionError, TimeoutError) as exc:
        raise LocationError(f"Cannot {what} {loc.uri}: {error_reason(exc, loc.uri)}") from exc


_CREDENTIALS = {
    "s3": "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile",
    "az": "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS",
}


def error_reason(exc: Exception, uri: str = "") -> str:
    """An object store's error as one short line that names its cause (and the variable to check)."""
    text = str(exc)
    scheme = uri.split("://", 1)[0] if "://" in uri else "s3"
    for code, said in (
        ("NoSuchBucket", "the bucket does not exist"),
        ("ContainerNotFound", "the container does not exist"),
        ("InvalidAccessKeyId", "the access key is not known (check AWS_ACCESS_KEY_ID)"),
        ("SignatureDoesNotMatch", "the credentials were refused (check AWS_SECRET_ACCESS_KEY)"),
        ("Invalid Access Key", "AZURE_STORAGE_ACCOUNT_KEY is not a valid key (base64)"),
        ("Base64", "AZURE_STORAGE_ACCOUNT_KEY is not a valid key (base64)"),
        ("AuthenticationFailed", "the credentials were refused (check AZURE_STORAGE_ACCOUNT_KEY)"),
        ("AuthorizationFailure", "the credentials were refused (check AZURE_STORAGE_ACCOUNT_KEY)"),
        ("AccessDenied", "access denied (check the credentials and the bucket policy)"),
        ("403 Forbidden", "access denied (check the credentials and the bucket policy)"),
        ("error sending request", "the endpoint does not answer"),
        ("Connection refused", "the endpoint does not answer"),
        ("dns error", "the endpoint's host name does not resolve"),
        ("credential", f"no usable credentials ({_CREDENTIALS.get(scheme, _CREDENTIALS['s3'])})"),
    ):
        if code.lower() in text.lower():
            return said
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _remove_empty_dirs(root: Path) -> None:
    if not root.is_dir():
        return
    for folder in sorted(
        (p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
    ):
        with contextlib.suppress(OSError):
            folder.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()
