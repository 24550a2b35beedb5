"""The HTTP layer (FastAPI). It imports neither torch nor the Sampler's code."""
