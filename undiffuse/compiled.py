"""Room for torch.compile's graphs: dynamo compiles a function once per distinct shape or
argument kind (a batch bucket, a combination of the sampler update's terms) and, past its
recompile limit (8 per function), runs the rest eager: slower, and no longer the same bits as
the compiled graphs."""

from __future__ import annotations


def allow_recompiles(graphs: int) -> None:
    """Raise dynamo's per-function recompile limit to at least `graphs` (it is never lowered)."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), graphs))
