"""``python -m curvkern ...``, and ``torchrun --nproc_per_node N -m curvkern score ...``."""

import sys

from .cli import main

sys.exit(main())
