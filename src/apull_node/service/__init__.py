"""What both node services share: their settings file, logging, systemd readiness and
Prometheus metrics (metrics.py, served by metrics_endpoint.py).

Standard library only: this package ships inside both node binaries (see apull.bundle), which
run on the node's own python3 without a venv.
"""
