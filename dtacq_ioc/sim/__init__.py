"""A simulated ACQ400 carrier: knob sites, the 4210 stream, the 2235 console and SSH."""

from dtacq_ioc.sim.card import SimCard
from dtacq_ioc.sim.server import Simulator, run_simulator

__all__ = ["SimCard", "Simulator", "run_simulator"]
