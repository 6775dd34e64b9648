"""``python -m pf_metaflow``: the ``pf-metaflow`` command line."""

import sys

from .cli import main

sys.exit(main())
