"""Running on ``torch.distributed`` (``torchrun``): the job's process group (:mod:`.context`)."""
from .context import DEFAULT_TIMEOUT_S, DistContext, process_group

__all__ = ["DistContext", "process_group", "DEFAULT_TIMEOUT_S"]
