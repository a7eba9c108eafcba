"""``python -m service``: the serving entry point (:mod:`service.main`), as ``genret-serve``."""

import sys

from service.main import main

sys.exit(main())
