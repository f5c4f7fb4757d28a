"""Solver objects. Each declares ``order``, ``stochastic``, ``nfe_per_step`` and implements ``step``."""
from .base import Solver, State
from .euler import Euler
from .heun import Heun
from .sde import EulerMaruyama, SDEDPMSolverPP
from .exponential import ExponentialIntegrator
from .ddim import DDIM
from .dpm_solver import DPMSolverPP
from .deis import DEIS
from .unipc import UniPC
from .bespoke import BespokeSolver
from .bespoke_ns import BespokeNSSolver
from .bespoke_train import fit_bespoke

__all__ = ["Solver", "State", "Euler", "Heun", "EulerMaruyama"]
__all__ += ["ExponentialIntegrator", "DDIM", "DPMSolverPP", "DEIS", "UniPC", "SDEDPMSolverPP"]
__all__ += ["BespokeSolver", "BespokeNSSolver", "fit_bespoke"]
