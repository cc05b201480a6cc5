from __future__ import annotations

import sys

from flowbench.cli import main

sys.exit(main())
