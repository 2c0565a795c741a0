"""`python3 -m apull_node.daemon` runs apulld."""

import sys

from apull_node.daemon.main import main

sys.exit(main())
