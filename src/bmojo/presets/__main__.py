"""``python -m bmojo.presets --write ROOT``: regenerate the preset folders."""
import sys

from .cards import main

sys.exit(main())
