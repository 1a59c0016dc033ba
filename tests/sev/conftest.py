"""Fixtures for the SEV tests: model platform services in their own processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sev_modelkit import make_model
from sev_testlib import ServiceHandle, start_service

from intrahost.sev.model.client import ModelPlatform
from intrahost.sev.model.kvm_sev import KvmModel


@pytest.fixture
def service_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., ServiceHandle]]:
    started: list[ServiceHandle] = []

    def factory(*extra: str) -> ServiceHandle:
        handle = start_service(tmp_path_factory.mktemp("sev"), *extra)
        started.append(handle)
        return handle

    yield factory
    for handle in started:
        handle.stop()


@pytest.fixture(scope="session")
def model_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceHandle]:
    handle = start_service(tmp_path_factory.mktemp("sev-session"))
    yield handle
    handle.stop()


@pytest.fixture
def model(model_service: ServiceHandle) -> Iterator[ModelPlatform]:
    platform = model_service.platform()
    yield platform
    platform.close()


@pytest.fixture
def kvm() -> KvmModel:
    """A KVM model with default settings, driven in-process (no service)."""
    return make_model()[0]
