"""The single list of solvers that drives the generic suites (orders, properties, gradients).

Adding a solver = one entry here. Each entry: (id, factory, declared order, kind) where kind is
"ode" or "sde". The order suites check ``empirical_order >= order - tolerance``.
"""
from adjointflow.solvers import Euler, EulerMaruyama, Heun

ODE_SOLVERS = [
    ("euler", Euler, 1),
    ("heun", Heun, 2),
]

SDE_SOLVERS = [
    ("euler_maruyama", EulerMaruyama, 1),
]

ALL_SOLVERS = [(i, f, o, "ode") for i, f, o in ODE_SOLVERS] + [(i, f, o, "sde") for i, f, o in SDE_SOLVERS]
