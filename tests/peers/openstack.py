"""Fixtures for the OpenStack peer (peers/openstack/peer.py).

The peer is described by the JSON file named in ``GOVBROKER_TEST_OPENSTACK`` (the test command
starts it before pytest). Without that variable the first worker that needs it starts one under
``.peers/openstack/run`` while holding a file lock, so two xdist workers never start two; the
last worker to finish with it stops it. A peer that cannot start makes the tests error.

Tests that use the peer take turns (``openstack_turn``) across workers; each gets a fresh
driver from ``contract_openstack`` or ``open_openstack_driver``.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.base import Driver, open_driver

ROOT = Path(__file__).resolve().parents[2]
PEER = ROOT / "peers" / "openstack" / "peer.py"
VENV_PYTHON = ROOT / ".peers" / "openstack" / "nova" / "bin" / "python"
RUN_DIR = ROOT / ".peers" / "openstack" / "run"
ENV_VAR = "GOVBROKER_TEST_OPENSTACK"


def _locked(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _answers(peer_json: Path) -> bool:
    try:
        url = json.loads(peer_json.read_text())["auth_url"]
        with urllib.request.urlopen(url, timeout=5):  # noqa: S310 - the peer's 127.0.0.1 URL
            return True
    except (OSError, ValueError, KeyError):
        return False


def _live_users(users_file: Path) -> set[int]:
    """The pids of the test processes using the shared peer; a killed run's pids drop out."""
    try:
        pids = {int(p) for p in users_file.read_text().split()}
    except (OSError, ValueError):
        return set()
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()}


def _start_shared_peer() -> Path:
    """Start the peer once for every worker of this run, or join the one already started.

    Each worker adds its pid to ``users`` under the lock; the last one to leave stops the peer.
    With no live user left the peer is started afresh (peer.py start clears any leftover)."""
    peer_json = RUN_DIR / "peer.json"
    users_file = RUN_DIR / "users"
    with _locked(RUN_DIR.parent / "run.lock"):
        users = _live_users(users_file)
        if not users or not _answers(peer_json):
            if not VENV_PYTHON.exists():
                raise RuntimeError(
                    "the OpenStack peer is not installed: run peers/openstack/setup.sh "
                    f"(or set {ENV_VAR} to a running peer's peer.json)"
                )
            result = subprocess.run(
                [str(VENV_PYTHON), str(PEER), "start", str(RUN_DIR)],
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(
                    f"the OpenStack peer did not start (exit {result.returncode}):\n"
                    f"{result.stdout}\n{result.stderr}"
                )
        users_file.write_text(" ".join(str(p) for p in {*users, os.getpid()}))
    return peer_json


def _release_shared_peer() -> None:
    users_file = RUN_DIR / "users"
    with _locked(RUN_DIR.parent / "run.lock"):
        users = _live_users(users_file) - {os.getpid()}
        users_file.write_text(" ".join(str(p) for p in users))
        if not users:
            subprocess.run(
                [str(VENV_PYTHON), str(PEER), "stop", str(RUN_DIR)],
                capture_output=True,
                timeout=300,
                check=False,
            )


@pytest.fixture(scope="session")
def openstack_peer() -> Iterator[dict[str, Any]]:
    """The running peer's description: auth_url, username, password, project_name, region…"""
    given = os.environ.get(ENV_VAR)
    if given:
        path = Path(given)
        if not path.is_file():
            raise RuntimeError(f"{ENV_VAR}={given} names no file: is the OpenStack peer running?")
        yield {**json.loads(path.read_text()), "lock_file": f"{path}.tests.lock"}
        return
    path = _start_shared_peer()
    try:
        yield {**json.loads(path.read_text()), "lock_file": f"{path}.tests.lock"}
    finally:
        _release_shared_peer()


@pytest.fixture
def openstack_turn(openstack_peer: dict[str, Any]) -> Iterator[None]:
    """One test at a time on the peer, across xdist workers: the contract measures cloud-wide
    allocation before and after a create, which another worker's servers would move."""
    with _locked(Path(openstack_peer["lock_file"])):
        yield


def open_openstack_driver(peer: dict[str, Any], **options: Any) -> Driver:
    credentials = {
        "username": peer["username"],
        "password": peer["password"],
        "project_name": peer["project_name"],
        "user_domain_name": peer["user_domain_name"],
        "project_domain_name": peer["project_domain_name"],
    }
    merged = {
        "region": peer["region"],
        "retry_max_wait": 0,
        "timeout_s": 60,
        "wait_timeout_s": 120,
        "poll_interval_s": 0.2,
        **options,
    }
    return open_driver("openstack", peer["auth_url"], credentials, merged)


@pytest.fixture
def contract_openstack(openstack_peer: dict[str, Any], openstack_turn: None) -> Iterator[Driver]:
    driver = open_openstack_driver(openstack_peer)
    try:
        driver.check()
        yield driver
    finally:
        driver.close()
