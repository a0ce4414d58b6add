"""Where the tables' files live: a local directory or S3-compatible storage, reached through
pyiceberg's FileIO (`S3FileIO`), with the AWS_* settings as its properties."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from pyarrow.fs import FileSystem, FileType
from pyiceberg.io import (
    PY_IO_IMPL,
    S3_ACCESS_KEY_ID,
    S3_CONNECT_TIMEOUT,
    S3_ENDPOINT,
    S3_REGION,
    S3_SECRET_ACCESS_KEY,
    S3_SESSION_TOKEN,
    FileIO,
    InputFile,
    OutputFile,
)
from pyiceberg.io.pyarrow import PyArrowFileIO
from pyiceberg.typedef import EMPTY_DICT, Properties

from streamapp.settings import Settings

DEFAULT_REGION = "us-east-1"  # with an endpoint and no region: MinIO, moto and Ceph accept any
CHECK_TIMEOUT_SECONDS = 5.0


class StorageError(Exception):
    """The warehouse cannot be used; the message is one line naming the setting to look at."""


class S3FileIO(PyArrowFileIO):
    """pyiceberg's pyarrow FileIO, whose writes and reads `streamapp.lake.files` relies on, but
    deleting through pyiceberg's fsspec FileIO (s3fs): pyarrow's S3 filesystem follows each delete
    with an empty "dir/" marker object for the parent (measured: deleting a/b/x leaves a/b/ even
    beside a/b/y), one more per metadata directory, which Iceberg does not know and no cleanup
    would remove."""

    def __init__(self, properties: Properties = EMPTY_DICT) -> None:
        super().__init__(properties)
        self._deletes: FileIO | None = None

    def _initialize_s3_fs(self, netloc: str | None) -> FileSystem:
        """pyiceberg's S3 filesystem, opening files lazily: a file under 5 MB (a commit's manifests
        and metadata, a window's data file) is then one PUT, not a multipart upload of three
        requests (measured on moto: 21 requests per 100-row commit before, see bench/RESULTS.md).
        An error to open is raised by the write or the close, before any commit refers to it."""
        fs = super()._initialize_s3_fs(netloc)
        reduced: Any = fs.__reduce__()  # the filesystem's own options, as pickling takes them
        rebuild, (options,) = reduced
        delayed: FileSystem = rebuild({**options, "allow_delayed_open": True})
        return delayed

    def delete(self, location: str | InputFile | OutputFile) -> None:
        path = location if isinstance(location, str) else location.location
        if urlparse(path).scheme not in ("s3", "s3a", "s3n"):
            super().delete(location)
            return
        if self._deletes is None:
            from pyiceberg.io.fsspec import FsspecFileIO  # s3fs: loaded by the first delete only (RSS)

            self._deletes = FsspecFileIO(self.properties)
        self._deletes.delete(path)


def file_io_properties(settings: Settings) -> dict[str, str]:
    """The FileIO properties of the warehouse (for the catalog, which hands them to its tables).
    An empty setting is left out: pyarrow then falls back on its own default chain (~/.aws files,
    an instance's role)."""
    if settings.warehouse_is_local:
        return {}
    props = {
        PY_IO_IMPL: f"{S3FileIO.__module__}.{S3FileIO.__qualname__}",
        S3_ENDPOINT: settings.aws_endpoint_url,
        S3_REGION: settings.aws_region or (DEFAULT_REGION if settings.aws_endpoint_url else ""),
        S3_ACCESS_KEY_ID: settings.aws_access_key_id,
        S3_SECRET_ACCESS_KEY: settings.aws_secret_access_key,
        S3_SESSION_TOKEN: settings.aws_session_token,
    }
    return {k: v for k, v in props.items() if v}


def check_storage(settings: Settings) -> None:
    """Raise StorageError unless the warehouse's bucket answers (the endpoint is reachable, the
    bucket exists, the credentials are accepted). One HEAD request; a local warehouse passes."""
    if settings.warehouse_is_local:
        return
    warehouse = str(settings.warehouse)
    bucket = warehouse.removeprefix("s3://").split("/", 1)[0]
    io = S3FileIO({**file_io_properties(settings), S3_CONNECT_TIMEOUT: str(CHECK_TIMEOUT_SECONDS)})
    where = f"AWS_ENDPOINT_URL={settings.aws_endpoint_url}" if settings.aws_endpoint_url else "AWS's endpoint"
    try:
        info = io.fs_by_scheme("s3", bucket).get_file_info(bucket)
    except OSError as e:
        reason = " ".join(str(e).split())
        lowered = reason.lower()
        if any(s in lowered for s in ("access_denied", "accessdenied", "invalidaccesskeyid", "signature", "forbidden")):
            raise StorageError(
                f"the storage at {where} refused the credentials for bucket {bucket!r} "
                f"(check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN): {reason}"
            ) from None
        raise StorageError(
            f"cannot reach the storage of STREAMAPP_WAREHOUSE={warehouse} at {where}: {reason}"
        ) from None
    if info.type == FileType.NotFound:
        raise StorageError(f"STREAMAPP_WAREHOUSE={warehouse}: bucket {bucket!r} does not exist at {where}")
