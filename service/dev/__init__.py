"""Development only: embedded servers (servers.py), the one-machine stack that every local user
starts (stack.py: dev.py, the tests, the benchmarks, the drills) and its command line (local.py,
behind `python3 dev.py up`). Nothing in a deployment imports this package."""
