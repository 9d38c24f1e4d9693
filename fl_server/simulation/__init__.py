"""In-process driver: the same coordinator, strategies and trainer as the REST deployment."""

from fl_server.simulation.runner import Simulation
from fl_server.simulation.centralized import CentralizedBaseline

__all__ = ["Simulation", "CentralizedBaseline"]
