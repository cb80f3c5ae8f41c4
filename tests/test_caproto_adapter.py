"""caproto's private names, used only by dtacq_ioc/caproto_adapter.py, still exist.

If caproto is upgraded, this test names what moved: fix the adapter, then add the
version to SUPPORTED_VERSIONS.
"""

from __future__ import annotations

import asyncio

import caproto
import pytest
from caproto.asyncio.client import Context as ClientContext

from dtacq_ioc import caproto_adapter
from dtacq_ioc.ioc.pvs import CheckedGroup, integer


def test_the_installed_caproto_is_one_the_adapter_was_written_for():
    assert caproto.__version__.startswith(caproto_adapter.SUPPORTED_VERSIONS), (
        f"caproto {caproto.__version__}: check caproto_adapter.PRIVATE_NAMES against it"
    )
    missing = list(caproto_adapter.missing_private_names())
    assert not missing, f"caproto {caproto.__version__} lacks {missing}"
    caproto_adapter.check_caproto()


def test_an_unknown_caproto_is_refused_with_words(monkeypatch):
    monkeypatch.setattr(caproto, "__version__", "9.0.0")
    with pytest.raises(caproto_adapter.UnsupportedCaproto, match=r"caproto 9\.0\.0 is installed"):
        caproto_adapter.check_caproto()


async def _same(value):
    return value


class _Group(CheckedGroup):
    value = integer("VALUE", "a value", limits=(0, 10), put=_same)


def test_instance_names_exist_on_a_live_server(loopback, monkeypatch):
    monkeypatch.setenv("EPICS_CA_AUTO_ADDR_LIST", "NO")
    monkeypatch.setenv("EPICS_CA_ADDR_LIST", loopback)
    group = _Group(prefix="ADAPTER:")

    async def main() -> None:
        server = caproto_adapter.make_server(group.pvdb, [loopback])
        served = asyncio.Event()

        async def hook(_lib):
            served.set()

        task = asyncio.create_task(server.run(startup_hook=hook))
        client = ClientContext()
        try:
            await asyncio.wait_for(served.wait(), 20)
            (pv,) = await client.get_pvs("ADAPTER:VALUE")
            await pv.wait_for_connection(timeout=10)
            await pv.write(3, wait=True, timeout=10)
            assert (await pv.read(timeout=10)).data[0] == 3
            entry = group.pvdb["ADAPTER:VALUE"]
            for name in caproto_adapter.PRIVATE_INSTANCE_NAMES["pv"]:
                assert hasattr(entry, name), f"caproto's ChannelData lost {name}"
            results = client.broadcaster.results
            for name in caproto_adapter.PRIVATE_CLIENT_NAMES:
                assert hasattr(results, name), f"caproto's client SearchResults lost {name}"
            assert caproto_adapter.forget_search(client, "ADAPTER:NOBODY") is True
            assert caproto_adapter.forget_search(client, "ADAPTER:VALUE") is False  # in use
            assert server.circuits, "the client's circuit is not in the server's context"
            for circuit in server.circuits:
                for name in caproto_adapter.PRIVATE_INSTANCE_NAMES["circuit"]:
                    assert hasattr(circuit, name), f"caproto's VirtualCircuit lost {name}"
        finally:
            await client.disconnect()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
