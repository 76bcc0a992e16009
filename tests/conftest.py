"""Root fixtures: see tests/fixtures/ for db (SQLite and PostgreSQL), auth, clock."""

import os

# Settings for the whole run, before anything reads them: cheap argon2, fixed keys, no ./var.
os.environ.setdefault("GOVBROKER_ARGON2_TIME_COST", "1")
os.environ.setdefault("GOVBROKER_ARGON2_MEMORY_KIB", "64")
os.environ.setdefault("GOVBROKER_SECRET_KEY", "test-secret-key-not-for-production-0123456789")
os.environ.setdefault("GOVBROKER_FERNET_KEY", "q5O6T2m1o6Yl0mR5XnLx8Yd7dM2s6B0k3QeW9vZr1aQ=")
os.environ.setdefault("GOVBROKER_LOG_LEVEL", "WARNING")

pytest_plugins = [
    "tests.fixtures.db",
    "tests.fixtures.auth",
    "tests.fixtures.clock",
    "tests.fixtures.quota",
    "tests.fixtures.inventory",
    "tests.fixtures.provisioning",
    "tests.fixtures.billing",
    "tests.peers.libvirt",
    "tests.peers.vcsim",
    "tests.peers.openstack",
]
