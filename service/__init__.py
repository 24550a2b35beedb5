"""The undiffuse job service: a Ray Serve application (HTTP ingress, Denoiser, queue workers)."""
