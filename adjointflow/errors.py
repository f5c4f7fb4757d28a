"""Exceptions raised by adjointflow."""

__all__ = ["NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """The model (or a solver update) produced NaN/Inf; the message names the step and time.

    Attributes ``step`` (index of the step, 0-based) and ``t`` (float: the time of the bad evaluation or
    update when it is known which went bad, as with ``check_finite="step"``; otherwise the time the bad
    step starts from) let callers react programmatically.
    """

    def __init__(self, message: str, step: int | None = None, t: float | None = None):
        super().__init__(message)
        self.step = step
        self.t = t
