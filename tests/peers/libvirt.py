"""Fixtures for the libvirt peer: libvirt's built-in test driver, one XML file per host.

No daemon is needed: ``test:///<absolute path>`` loads a host (CPUs, memory, domains with their
metadata and run states, networks, storage pools and volumes) into the connection that opens it.
Every connection gets a private copy of that state, so each test's driver starts from the files in
``tests/peers/data/`` and sees only what it did itself.

libvirt-python is imported only inside the fixtures: this plugin is loaded for every test run,
and a machine without it must still run the rest of the suite (its libvirt tests then error).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from drivers.base import Driver, open_driver

if TYPE_CHECKING:
    from drivers.libvirt import LibvirtDriver

DATA = Path(__file__).parent / "data"


def libvirt_host_uri(name: str) -> str:
    """The test-driver URI of one of the project's host files (``a`` → libvirt-host-a.xml)."""
    path = (DATA / f"libvirt-host-{name}.xml").resolve()
    if not path.is_file():
        raise FileNotFoundError(path)
    return f"test://{path}"


@pytest.fixture
def libvirt_endpoint() -> str:
    """Every host file, one URI each: the provider is the set of those hosts."""
    files = sorted(DATA.glob("libvirt-host-*.xml"))
    assert len(files) >= 2, f"the libvirt peer needs two host files in {DATA}"
    return ", ".join(f"test://{path.resolve()}" for path in files)


MakeLibvirtDriver = Callable[..., "LibvirtDriver"]


@pytest.fixture
def make_libvirt_driver(libvirt_endpoint: str) -> Iterator[MakeLibvirtDriver]:
    """Open LibvirtDrivers (every host by default, no retry backoff); all closed afterwards."""
    from drivers.libvirt import LibvirtDriver

    opened: list[LibvirtDriver] = []

    def make(
        endpoint: str | None = None,
        credentials: dict[str, str] | None = None,
        **options: Any,
    ) -> LibvirtDriver:
        driver = LibvirtDriver(
            endpoint or libvirt_endpoint, credentials or {}, {"retry_max_wait": 0, **options}
        )
        opened.append(driver)
        return driver

    yield make
    for driver in opened:
        driver.close()


@pytest.fixture
def contract_libvirt(libvirt_endpoint: str) -> Iterator[Driver]:
    """A fresh LibvirtDriver connected to both project hosts, opened through the registry."""
    driver = open_driver("libvirt", libvirt_endpoint, {}, {"retry_max_wait": 0})
    driver.check()
    try:
        yield driver
    finally:
        driver.close()
