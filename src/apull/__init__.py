"""apull-deploy: put the apull lazy-loading stack on a fleet of nodes and keep it there."""

__version__ = "0.1.0"
