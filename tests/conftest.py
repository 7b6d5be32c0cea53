"""Shared fixtures: the real lab (a QEMU guest behind a bridge in network namespaces).

``lab_domain`` (session): the DomainConfig of lab domain 1, bringing the lab up if needed and
reusing a healthy one. At session end it tears the lab down only if it brought it up and no
other live process registered as a user ($XFGATE_LAB_KEEP=1 keeps it up). Without root or a
prerequisite, lab tests skip with the reason; with CI=true they fail instead.
``client`` runs commands in the client namespace (the guests' outside world).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest

from xfgate.config import DomainConfig
from xfgate_lab import lab
from xfgate_lab.layout import LabLayout, layout_from_env
from xfgate_lab.users import live_users, register_user, unregister_user


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_lab_prerequisites() -> None:
    """Skip (or, in CI, fail) when this machine cannot run the lab."""
    problems = lab.prerequisite_problems(os.geteuid(), shutil.which)
    if problems:
        reason = "lab prerequisites missing: " + "; ".join(problems)
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def lab_layout() -> LabLayout:
    return layout_from_env()


@pytest.fixture(scope="session")
def lab_domain(lab_layout: LabLayout) -> Iterator[DomainConfig]:
    require_lab_prerequisites()
    result = lab.lab_up(lab_layout, domains=1)
    register_user(lab_layout)
    dom = next((d for d in result.domains if d.id == 1), None)
    assert dom is not None, "lab up did not produce domain 1"
    try:
        yield dom
    finally:
        unregister_user(lab_layout)
        others = live_users(lab_layout)
        if result.already_up or os.environ.get("XFGATE_LAB_KEEP") == "1":
            pass
        elif others:
            print(f"\nlab left up: still used by pid(s) {others}")
        else:
            lab.lab_down(lab_layout)


@dataclass(frozen=True)
class ClientNetns:
    """The client namespace: peers of the guests' workload, and where tests send from."""

    layout: LabLayout

    @property
    def name(self) -> str:
        return self.layout.client_netns

    def run(self, argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def http_get(self, host: str, port: int, timeout: float = 5.0) -> str | None:
        return lab.client_http_get(self.layout, host, port, timeout)


@pytest.fixture(scope="session")
def client(lab_layout: LabLayout, lab_domain: DomainConfig) -> ClientNetns:
    return ClientNetns(lab_layout)
