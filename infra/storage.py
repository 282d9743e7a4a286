"""S3 access outside MLflow (buckets, uploads, listings) through one small boto3 module.

Any S3 endpoint: AWS (no endpoint), MinIO or a local test server (``endpoint_url``). Credentials
come from the standard AWS chain (environment, profile, instance role), never from kdnas config.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError

# Adaptive retries ride out throttling and brief outages; path-style addressing works with
# MinIO and local endpoints as well as AWS.
_BOTO_CONFIG = Config(retries={"max_attempts": 8, "mode": "adaptive"}, s3={"addressing_style": "path"})
# Multipart above 16 MiB, so large student folders and caches upload in resumable parts.
TRANSFER = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20)


def s3_client(endpoint_url: str | None = None):
    endpoint_url = endpoint_url or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint_url, config=_BOTO_CONFIG)


def check_access(uri: str, endpoint_url: str | None = None, field: str = "tracking.artifact_location") -> None:
    """Fail in one line, before a search starts, when an s3:// location (named by its config
    ``field``) cannot be reached with the credentials of the AWS chain."""
    from botocore.exceptions import NoCredentialsError

    from kdnas_core.errors import KdnasError

    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    where = f"{field} = {uri!r}"
    try:
        s3_client(endpoint_url).head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise KdnasError(f"{where}: no AWS credentials found (environment, profile or role)") from None
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise KdnasError(f"{where}: bucket {bucket!r} does not exist") from None
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            raise KdnasError(f"{where}: access denied ({code}) with the credentials from the AWS chain; "
                             "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE") from None
        raise KdnasError(f"{where}: S3 error {code or err}") from None
    except BotoCoreError as err:
        raise KdnasError(f"{where}: S3 endpoint unreachable ({type(err).__name__})") from None


def ensure_bucket(bucket: str, endpoint_url: str | None = None) -> None:
    s3 = s3_client(endpoint_url)
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        s3.create_bucket(Bucket=bucket)


def upload_dir(local: Path, bucket: str, prefix: str, endpoint_url: str | None = None) -> list[str]:
    s3 = s3_client(endpoint_url)
    keys = []
    for f in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        key = f"{prefix.rstrip('/')}/{f.relative_to(local).as_posix()}"
        s3.upload_file(str(f), bucket, key, Config=TRANSFER)
        keys.append(key)
    return keys


def list_keys(bucket: str, prefix: str = "", endpoint_url: str | None = None) -> list[str]:
    s3 = s3_client(endpoint_url)
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


class S3SharedStates:
    """Teacher-state caches under ``s3://bucket/prefix/teacher_states/<key>/`` (``paths.shared_cache``).

    A cache is published with its ``meta.json`` last, so a reader never takes a half-uploaded
    one for complete; fetched files land in a temporary folder renamed into place, and the
    caller then verifies them against the sha256 manifest in ``meta.json`` like any local cache.
    """

    def __init__(self, uri: str, endpoint_url: str | None = None):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        self.bucket, self.prefix = bucket, f"{prefix.strip('/')}/teacher_states".lstrip("/")
        self.s3 = s3_client(endpoint_url)

    def _key(self, key: str, name: str = "") -> str:
        return f"{self.prefix}/{key}/{name}"

    def _published(self, key: str) -> bool:
        try:
            self.s3.head_object(Bucket=self.bucket, Key=self._key(key, "meta.json"))
            return True
        except ClientError:
            return False

    def fetch(self, key: str, dest: Path) -> bool:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{key}-"))
        try:
            return self._published(key) and self._download(key, dest, tmp)
        except (ClientError, BotoCoreError) as err:  # the store went away: run the teacher here instead
            warnings.warn(f"{self.bucket}/{self._key(key)}: could not fetch shared teacher states ({type(err).__name__}); "
                          "computing them locally")
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _download(self, key: str, dest: Path, tmp: Path) -> bool:
        try:
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(key))
            names = [o["Key"].removeprefix(self._key(key)) for page in pages for o in page.get("Contents", [])]
            for name in names:
                # Flat folders of .npy and meta.json only: no path from storage is trusted.
                if "/" in name or name in ("", ".", ".."):
                    continue
                self.s3.download_file(self.bucket, self._key(key, name), str(tmp / name), Config=TRANSFER)
            tmp.rename(dest)
            return True
        except OSError:  # another process put it there first
            return (dest / "meta.json").is_file()

    def publish(self, key: str, src: Path) -> None:
        try:
            if self._published(key):
                return
            files = sorted(p for p in Path(src).iterdir() if p.is_file() and p.name != "meta.json")
            for f in files:
                self.s3.upload_file(str(f), self.bucket, self._key(key, f.name), Config=TRANSFER)
            self.s3.upload_file(str(Path(src) / "meta.json"), self.bucket, self._key(key, "meta.json"))
        except (ClientError, BotoCoreError, S3UploadFailedError) as err:  # workers then run the teacher themselves
            warnings.warn(f"{self.bucket}/{self._key(key)}: could not publish teacher states ({type(err).__name__})")


if __name__ == "__main__":  # used by infra/s3-server.sh: python -m infra.storage ensure-bucket NAME
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "ensure-bucket":
        ensure_bucket(sys.argv[2])
    else:
        sys.exit("usage: python -m infra.storage ensure-bucket BUCKET")
