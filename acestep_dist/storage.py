"""Where prep output and training runs live: a local folder or a URL (``s3://bucket/path``, any fsspec URL).

S3 needs the ``s3`` extra (s3fs). An S3-compatible store (MinIO, Ceph, ...) is configured as the AWS tools
configure it: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (or a profile, or a node's instance role), ``AWS_REGION``. s3fs (botocore) and
pyarrow, which Ray Train uses for checkpoints, both read these.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import UserError
from .paths import is_url

_EXTRAS = {"s3": "s3", "s3a": "s3"}


def open_fs(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and path of a folder or URL (path without a trailing slash)."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(str(url))
    except ImportError as error:
        extra = _EXTRAS.get(str(url).split("://", 1)[0])
        hint = f"; install it with: pip install 'acestep-dist[{extra}]'" if extra else ""
        raise UserError(f"{url}: {error}{hint}") from None
    return fs, root.rstrip("/")


def ray_train_storage(run: str) -> tuple[str, str, Any]:
    """``(storage_path, name, storage_filesystem)`` of a run folder for Ray Train's ``RunConfig``.

    For a URL the pyarrow filesystem is made here, from the driver's environment: Ray's controller and
    workers would otherwise each resolve the URL from their own environment, which on a cluster (and in an
    embedded cluster started earlier) lacks the driver's endpoint and credentials. Credentials given as
    ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` travel inside the filesystem object to those processes;
    without them each node uses its own (profile, instance role).
    """
    parent, name = run.rstrip("/").rsplit("/", 1)
    if not is_url(run):
        return parent, name, None
    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(parent)
    except (OSError, ValueError) as error:  # unreachable endpoint, bad URL
        raise UserError(f"{run}: {error}") from None
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if isinstance(filesystem, pyarrow.fs.S3FileSystem) and key and secret:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        filesystem = pyarrow.fs.S3FileSystem(
            access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"),
            region=filesystem.region, **({"endpoint_override": endpoint} if endpoint else {}))
    return path, name, filesystem
