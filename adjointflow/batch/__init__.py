"""Batch inverse problems over many inputs, resumable and sharded over ``torchrun`` ranks
(:func:`guide`; command line ``python -m adjointflow guide``)."""
from .runner import GuideOutcome, guide, item_seed

__all__ = ["guide", "GuideOutcome", "item_seed"]
