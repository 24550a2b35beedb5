"""Queue consumers: read shards from the Redis stream, call the Sampler, upload PNGs, ack."""
