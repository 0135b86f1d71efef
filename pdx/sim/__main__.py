import sys

from pdx.sim.cli import main

sys.exit(main())
