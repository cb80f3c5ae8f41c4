"""The one-time write token: made only by a loopback-only bridge with no token configured."""

from __future__ import annotations

import re

import pytest
from bridge_helpers import bridge_config, bridge_process, new_port
from ioc_support import wait_for
from support import output

from dtacq_ioc.bridge.auth import TokenCheck, loopback_only
from dtacq_ioc.config import BridgeConfig, Secret


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.5.6.7", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("", False), ("10.0.0.5", False), ("ioc.example.org", False)],
)  # fmt: skip
def test_loopback_only(host: str, loopback: bool) -> None:
    assert loopback_only(host) is loopback


def test_one_time_token_only_on_loopback_without_tokens() -> None:
    made = TokenCheck.for_bridge(BridgeConfig(host="127.0.0.1"))
    assert made.one_time and len(made.one_time) >= 32 and made.check(made.one_time)
    assert not made.check("guess") and not made.check("")
    again = TokenCheck.for_bridge(BridgeConfig(host="127.0.0.1"))
    assert again.one_time != made.one_time  # a new one for each start
    # An environment variable that is not set configures no token: a one-time one is made.
    unset = BridgeConfig(host="127.0.0.1", tokens=(Secret(env="DTACQ_TEST_UNSET_TOKEN_XYZ"),))
    assert TokenCheck.for_bridge(unset).one_time
    configured = TokenCheck.for_bridge(
        BridgeConfig(host="127.0.0.1", tokens=(Secret(literal="t"),))
    )
    assert configured.one_time is None and configured.check("t")
    public = TokenCheck.for_bridge(BridgeConfig(host="0.0.0.0"))
    assert public.one_time is None and not public.enabled


def test_bridge_logs_the_link_only_when_it_made_a_token(tmp_path) -> None:
    port = new_port()
    (tmp_path / "a").mkdir()
    with bridge_process(bridge_config(tmp_path / "a", port), port) as proc:
        link = wait_for(
            lambda: re.search(rf"open (http://127\.0\.0\.1:{port}/\?token=\S+)", output(proc)),
            "the page link in the bridge's log",
        )
    assert len(link.group(1).split("token=")[1]) >= 32
    port = new_port()
    (tmp_path / "b").mkdir()
    with bridge_process(bridge_config(tmp_path / "b", port, tokens=["conf"]), port) as proc:
        wait_for(lambda: "bridge on http://" in output(proc), "the bridge's start line")
        assert "token=" not in output(proc) and "conf" not in output(proc)
