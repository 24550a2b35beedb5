"""The undiffuse job service: a Ray Serve application (HTTP ingress, Sampler, queue workers)."""
