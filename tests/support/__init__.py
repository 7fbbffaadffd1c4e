"""Helpers shared by the tests and the bench scripts, each written once.

- ports.py: a free loopback port.
- polling.py: wait for a condition, with a deadline.
- processes.py: child processes stopped by their own pid: `pha serve`, `pha worker`, any HTTP server.
- redis_server.py: a private redis-server (its own port and folder), never the shared one.
- jobs.py: wait for an /adapt job to finish.
- app.py: the app in process behind Starlette's TestClient, and its /metrics.
- tiny.py: tiny random PHA configs (seconds to build).
- deployfiles.py: readers of the deployment files (kustomize, Dockerfile, compose).

Imported as `tests.support.<module>`: the repository root must be on sys.path, as it is under `python -m pytest`
from the root; bench scripts put it there themselves (they run as `python bench/<name>.py`).
"""
