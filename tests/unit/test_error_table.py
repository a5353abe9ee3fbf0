"""Every exception cloudhpc raises has a deliberate HTTP answer; only a bug may become a 500."""

from __future__ import annotations

import inspect

import pytest

from cloudhpc import exceptions
from cloudhpc.porter.errors import status_for

EXPECTED = {
    "CloudHPCError": 500,
    "ConfigError": 500,
    "InvalidTransition": 409,
    "SSHError": 502,
    "SSHConnectError": 502,
    "HostKeyError": 502,
    "CommandTimeout": 504,
    "OutputTooLarge": 502,
    "RemoteFileError": 502,
    "SchedulerError": 500,
    "SchedulerCommandError": 500,
    "SubmitRejected": 400,
    "QuotaExceeded": 403,
    "AccountingUnavailable": 500,
    "JobNotFound": 404,
    "ParseError": 500,
    "EnvironmentBuildError": 500,
    "StoreError": 503,
    "BridgePortsExhausted": 503,
    "IdempotencyConflict": 409,
    "UnknownJob": 404,
    "StorageError": 502,
    "ObjectNotFound": 404,
    "KubernetesError": 502,
    "PipelineError": 500,
    "JobFailed": 500,
    "QualityGateFailed": 500,
}


def all_exceptions() -> list[type[exceptions.CloudHPCError]]:
    return [
        cls
        for _, cls in inspect.getmembers(exceptions, inspect.isclass)
        if issubclass(cls, exceptions.CloudHPCError)
    ]


def test_every_exception_is_in_this_table() -> None:
    assert sorted(c.__name__ for c in all_exceptions()) == sorted(EXPECTED)


@pytest.mark.parametrize("cls", all_exceptions(), ids=lambda c: c.__name__)
def test_status(cls: type[exceptions.CloudHPCError]) -> None:
    error = cls.__new__(cls)
    Exception.__init__(error, "x")
    assert status_for(error)[0] == EXPECTED[cls.__name__]


def test_every_exception_is_exported_and_drawn() -> None:
    for cls in all_exceptions():
        assert cls.__name__ in exceptions.__all__
        assert cls.__name__ in (exceptions.__doc__ or "")
