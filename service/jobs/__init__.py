"""Jobs in Redis: keys, records and their transitions (store), the shard queue (queue), and
what happens when a job starts or ends (lifecycle). Torch-free, Ray-free except for metrics."""
