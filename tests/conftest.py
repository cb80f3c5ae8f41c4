from __future__ import annotations

import pytest
from support import random_loopback


@pytest.fixture
def loopback() -> str:
    """A loopback address of this test's own, for a simulated card at its real ports."""
    return random_loopback()
