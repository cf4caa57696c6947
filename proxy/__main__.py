"""``python -m proxy`` is ``oaimux``."""

import sys

from .cli import main

sys.exit(main())
