"""``python -m cli``: the ``genret`` command line (what ``torchrun ... -m cli train`` runs)."""

import sys

from cli.main import main

sys.exit(main())
