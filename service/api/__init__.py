"""The HTTP layer (FastAPI). It imports neither torch nor the Denoiser's code."""
