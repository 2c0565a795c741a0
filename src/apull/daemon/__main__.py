"""`python3 -m apull.daemon` runs apulld."""

import sys

from apull.daemon.main import main

sys.exit(main())
