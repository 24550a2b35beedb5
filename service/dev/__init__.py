"""Development only: embedded servers (servers.py) and the one-machine stack (local.py) behind
`python3 dev.py up` and the integration tests. Nothing in a deployment imports this package."""
