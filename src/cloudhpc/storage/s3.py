"""Objects in an S3 bucket (AWS, CSC Allas, MinIO, SeaweedFS) through boto3.

This is the only module that imports boto3. Credentials come from the arguments (read from
configuration by the caller) or boto3's standard chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`,
`AWS_PROFILE`, `~/.aws/credentials`): never from an API request. botocore retries transient
failures itself (standard mode); what still fails is translated to `StorageError` in `_s3_errors`.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from cloudhpc.exceptions import ObjectNotFound, StorageError
from cloudhpc.storage.base import MULTIPART_THRESHOLD, check_key, check_prefix

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["S3ObjectStore"]

log = logging.getLogger(__name__)

_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


@contextlib.contextmanager
def _s3_errors(action: str, what: str) -> Iterator[None]:
    """The one place where boto3/botocore errors become `StorageError`s, with S3's error code."""
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        error: dict[str, Any] = dict(exc.response.get("Error", {}))
        code = str(error.get("Code", "?"))
        if code in _MISSING_CODES:
            raise ObjectNotFound(f"no object {what}") from exc
        message = error.get("Message") or code
        raise StorageError(f"S3 refused to {action} {what}: {code}: {message}") from exc
    except boto3.exceptions.Boto3Error as exc:  # S3UploadFailedError and the other transfer errors
        raise StorageError(f"cannot {action} {what}: {exc}") from exc
    except botocore.exceptions.NoCredentialsError as exc:
        raise StorageError(
            f"cannot {action} {what}: no S3 credentials (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        ) from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise StorageError(f"cannot {action} {what}: {exc}") from exc


class S3ObjectStore:
    """`S3ObjectStore("bucket", "some/prefix", endpoint_url="https://a3s.fi")`.

    Keys are stored under `prefix/` in the bucket and returned without it. A custom endpoint
    (anything but AWS) gets path-style addressing, which every S3-compatible server accepts.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        max_attempts: int = 5,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        page_size: int = 1000,
    ) -> None:
        if not bucket or "/" in bucket:
            raise StorageError(f"S3 bucket name {bucket!r} is empty or holds a `/`")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url
        self._page_size = max(1, min(page_size, 1000))
        config = botocore.config.Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            signature_version="s3v4",
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            # S3-compatible servers (Ceph behind Allas, older SeaweedFS/MinIO) reject the
            # checksum headers boto3 sends by default since 1.36.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        with _s3_errors("connect to", f"bucket {bucket!r}"):
            session = boto3.session.Session(
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                aws_session_token=session_token,
                region_name=region,
            )
            self._client: S3Client = session.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region or session.region_name or "us-east-1",
                config=config,
            )
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=max(multipart_threshold, 5 << 20),
            max_concurrency=4,
        )

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3ObjectStore('s3://{self.bucket}/{self.prefix}'{where})"

    def _full(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _what(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def put(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        full = self._full(key)
        extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        with _s3_errors("store", self._what(key)):
            self._client.put_object(Bucket=self.bucket, Key=full, Body=data, **extra)

    def upload_file(self, key: str, path: Path, *, content_type: str | None = None) -> None:
        full = self._full(key)
        if not Path(path).is_file():
            raise StorageError(f"cannot upload {path} as {key!r}: not a regular file")
        extra = {"ContentType": content_type} if content_type else None
        with _s3_errors("upload", self._what(key)):
            self._client.upload_file(str(path), self.bucket, full, ExtraArgs=extra, Config=self._transfer)

    def get(self, key: str) -> bytes:
        full = self._full(key)
        with _s3_errors("read", self._what(key)):
            response = self._client.get_object(Bucket=self.bucket, Key=full)
            body: bytes = response["Body"].read()
            return body

    def iter_bytes(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        full = self._full(key)
        with _s3_errors("read", self._what(key)):
            body = self._client.get_object(Bucket=self.bucket, Key=full)["Body"]
        return self._chunks(body, key, chunk_size)

    def _chunks(self, body: Any, key: str, chunk_size: int) -> Iterator[bytes]:
        try:
            with _s3_errors("read", self._what(key)):
                yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def delete(self, key: str) -> None:
        full = self._full(key)
        with _s3_errors("delete", self._what(key)):
            self._client.delete_object(Bucket=self.bucket, Key=full)

    def list(
        self, prefix: str = "", *, start_after: str | None = None, limit: int = 1000
    ) -> builtins.list[str]:
        check_prefix(prefix)
        keys: builtins.list[str] = []
        token: str | None = None
        cut = len(self.prefix)
        while len(keys) < limit:
            params: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": self.prefix + prefix,
                "MaxKeys": min(self._page_size, limit - len(keys)),
            }
            if token:
                params["ContinuationToken"] = token
            elif start_after is not None:
                params["StartAfter"] = self.prefix + start_after
            with _s3_errors("list", f"s3://{self.bucket}/{self.prefix}{prefix}*"):
                page = self._client.list_objects_v2(**params)
            keys.extend(item["Key"][cut:] for item in page.get("Contents", []))
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
        return keys[:limit]

    def url(self, key: str, expires: int = 3600) -> str:
        full = self._full(key)
        with _s3_errors("sign a URL for", self._what(key)):
            url: str = self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": full}, ExpiresIn=expires
            )
            return url
