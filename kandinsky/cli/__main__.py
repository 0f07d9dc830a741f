"""``python -m kandinsky.cli ARGS`` (and ``torchrun ... -m kandinsky.cli batch|train ...``): ``kandinsky ARGS``."""
import sys

from kandinsky.cli import main

sys.exit(main())
