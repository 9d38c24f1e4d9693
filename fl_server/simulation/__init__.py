"""In-process driver: the same coordinator, strategies and trainer as the REST deployment."""

from fl_server.simulation.runner import Simulation
from fl_server.simulation.centralized import CentralizedBaseline
from fl_server.simulation.async_runner import AsyncSimulation

__all__ = ["Simulation", "AsyncSimulation", "CentralizedBaseline"]
