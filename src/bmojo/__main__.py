"""``python -m bmojo ...`` is the ``bmojo`` command."""
import sys

from .cli import main

sys.exit(main())
