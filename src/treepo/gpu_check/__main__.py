"""`python -m treepo.gpu_check`: see `treepo.gpu_check.runner`."""

import sys

from .runner import main

sys.exit(main())
