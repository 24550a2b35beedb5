"""Queue consumers: read shards from the queue, call the Denoiser, upload PNGs, settle."""
