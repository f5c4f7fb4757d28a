"""Solver objects. Each declares ``order``, ``stochastic``, ``nfe_per_step`` and implements ``step``."""
from .base import Solver, State
from .euler import Euler
from .heun import Heun
from .sde import EulerMaruyama

__all__ = ["Solver", "State", "Euler", "Heun", "EulerMaruyama"]
