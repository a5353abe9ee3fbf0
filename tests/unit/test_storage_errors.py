"""Every error boto3 and botocore can raise leaves `storage/s3.py` as a `StorageError`.

Like httpx's `test_httpcore_all_exceptions_mapped`: if a new botocore version adds an exception
class, it is still mapped (by its base class), and the mapping keeps the evidence in the message.
"""

from __future__ import annotations

import boto3.exceptions
import botocore.exceptions
import pytest

from cloudhpc.exceptions import ObjectNotFound, StorageError
from cloudhpc.storage.s3 import _s3_errors


def client_error(code: str, message: str = "msg") -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": message}}, "GetObject")


def all_subclasses(cls: type[Exception]) -> set[type[Exception]]:
    found: set[type[Exception]] = set()
    for sub in cls.__subclasses__():
        found |= {sub, *all_subclasses(sub)}
    return found


@pytest.mark.parametrize("code", ["NoSuchKey", "404", "NotFound"])
def test_missing_objects(code: str) -> None:
    with pytest.raises(ObjectNotFound, match="s3://b/k"), _s3_errors("read", "s3://b/k"):
        raise client_error(code)


@pytest.mark.parametrize("code", ["AccessDenied", "SignatureDoesNotMatch", "NoSuchBucket", "SlowDown"])
def test_refusals_keep_the_s3_code(code: str) -> None:
    with pytest.raises(StorageError, match=code) as excinfo, _s3_errors("store", "s3://b/k"):
        raise client_error(code, "detail")
    assert not isinstance(excinfo.value, ObjectNotFound)
    assert "detail" in str(excinfo.value)


def test_missing_credentials_say_where_to_put_them() -> None:
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID"), _s3_errors("list", "s3://b/"):
        raise botocore.exceptions.NoCredentialsError()


def test_every_botocore_and_boto3_error_is_mapped() -> None:
    classes = all_subclasses(botocore.exceptions.BotoCoreError) | all_subclasses(boto3.exceptions.Boto3Error)
    assert len(classes) > 50
    for cls in classes:
        # Built without its own __init__, whose keyword arguments differ from class to class.
        error = cls.__new__(cls)
        Exception.__init__(error, "boom")
        with pytest.raises(StorageError), _s3_errors("read", "s3://b/k"):
            raise error
