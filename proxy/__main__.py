"""``python -m proxy`` is ``oaimux``."""

import sys

from . import early_signals

early_signals.hold()  # before anything else, as in cli.main (see proxy/cli.py)

from .cli import main  # noqa: E402 - after the signals are held

sys.exit(main())
