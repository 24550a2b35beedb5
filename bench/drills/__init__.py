"""The fault drills (docs/reliability.md), one module per family of faults:

load.py       the clients: jobs submitted and polled under load, every answer recorded
kills.py      phase 1: Worker and Denoiser replicas killed (kill -9) under load
outages.py    phases 2 and 3: Redis killed and restarted from its AOF, S3 stopped and started
hostile.py    phase 4: 100 hostile requests over a raw socket
verify.py     every job's images counted, downloaded and decoded; manifests checked
report.py     targets met or missed, and the table
resources.py  what one client may take of what every tenant shares (its own stack and table)

python -m bench.drills [--short] [--json out.json] [--seed N]
python -m bench.drills.resources
"""
