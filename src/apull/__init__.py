"""apull-deploy: put the apull lazy-loading stack on a fleet of nodes and keep it there.

This is the controller's package (CLI, inventory, lab, bundle builder, installers, converter);
what runs on the nodes is `apull_node`.
"""

from apull_node import __version__

__all__ = ["__version__"]
