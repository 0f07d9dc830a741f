"""``python -m kandinsky.cli ARGS`` (and ``torchrun ... -m kandinsky.cli batch|train ...``): the ``kandinsky`` command."""
import sys

from kandinsky.cli import main

sys.exit(main())
