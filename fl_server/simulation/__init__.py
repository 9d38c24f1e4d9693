"""In-process driver: the same coordinator, strategies and trainer as the REST deployment.

:class:`Simulation` (synchronous rounds, with secure aggregation as configured) and
:class:`AsyncSimulation` (FedAsync / FedBuff on a virtual clock) are siblings over
:class:`~fl_server.simulation.base.SimulationBase`.
"""

from fl_server.simulation.async_runner import AsyncSimulation
from fl_server.simulation.base import SimulationBase
from fl_server.simulation.centralized import CentralizedBaseline
from fl_server.simulation.runner import Simulation

__all__ = ["Simulation", "AsyncSimulation", "SimulationBase", "CentralizedBaseline"]
