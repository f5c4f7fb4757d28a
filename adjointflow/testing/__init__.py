"""Analytic truth for property tests: exact Gaussian/mixture denoisers, PF-ODE maps and their
gradients, linear-Gaussian posteriors, empirical orders and hypothesis strategies
(``adjointflow.testing.strategies``, needs ``hypothesis``)."""
from .analytic import GaussianData, GaussianMixture, linear_gaussian_posterior
from .order import empirical_order, local_orders

__all__ = ["GaussianData", "GaussianMixture", "linear_gaussian_posterior", "empirical_order", "local_orders"]
