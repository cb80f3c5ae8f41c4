"""dtacq-ioc: EPICS IOC, browser bridge, run archive and simulator for D-TACQ ACQ400 cards."""

__version__ = "0.1.0"
