"""adjointflow: differentiable ODE/SDE solvers for diffusion and flow-matching models.

    import adjointflow as af
    den = af.Denoiser(net, af.VPLinear(), prediction="eps")
    sol = af.solve(den, x1, af.timesteps(den.schedule, 20), af.Heun())
"""
from .adjoint import Backprop, Checkpoint, ContinuousAdjoint
from .compiled import Compile
from .driver import Solution, StepInfo, solve
from .errors import NonFiniteError
from .grids import timesteps
from .models import ClassifierFreeGuidance, Denoiser, Prediction
from .noise import BrownianNoise
from .schedules import EDM, VE, LinearFlow, NoiseSchedule, VPCosine, VPDiscrete, VPLinear
from .solvers import Euler, EulerMaruyama, Heun, Solver, State
from .solvers import DDIM, DEIS, DPMSolverPP, SDEDPMSolverPP, UniPC
from .solvers import BespokeNSSolver, BespokeSolver, fit_bespoke
from . import pretrained

__version__ = "0.1.0"

__all__ = [
    "solve", "Solution", "StepInfo", "NonFiniteError", "timesteps", "Compile",
    "Denoiser", "Prediction", "ClassifierFreeGuidance", "BrownianNoise",
    "NoiseSchedule", "VPLinear", "VPCosine", "VPDiscrete", "VE", "EDM", "LinearFlow",
    "Solver", "State", "Euler", "Heun", "EulerMaruyama", "Backprop", "Checkpoint", "ContinuousAdjoint",
]
__all__ += ["DDIM", "DEIS", "DPMSolverPP", "SDEDPMSolverPP", "UniPC"]
__all__ += ["BespokeSolver", "BespokeNSSolver", "fit_bespoke", "pretrained"]
