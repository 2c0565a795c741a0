"""What both node services share: their settings file, logging and systemd readiness.

Standard library only: this package ships inside both node binaries (see apull.bundle), which
run on the node's own python3 without a venv.
"""
