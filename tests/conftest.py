from __future__ import annotations

import os

import pytest
from support import free_port, random_loopback

# Channel Access for this pytest process only: its own server port, so IOCs started by
# concurrent test runs never answer each other's searches. Set before any test imports
# a CA library (libca reads these once); child processes inherit them.
os.environ["EPICS_CA_SERVER_PORT"] = str(free_port())
os.environ["EPICS_CA_REPEATER_PORT"] = str(free_port())
os.environ["EPICS_CA_ADDR_LIST"] = "127.0.0.1"
os.environ["EPICS_CA_AUTO_ADDR_LIST"] = "NO"
os.environ["EPICS_CAS_INTF_ADDR_LIST"] = "127.0.0.1"
os.environ.setdefault("EPICS_CA_MAX_ARRAY_BYTES", str(64 * 1024 * 1024))


@pytest.fixture
def loopback() -> str:
    """A loopback address of this test's own, for a simulated card at its real ports."""
    return random_loopback()
