import sys

from flowbench.cli import main

sys.exit(main())
