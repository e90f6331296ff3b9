import sys

from nct_openmm.cli import main

sys.exit(main())
