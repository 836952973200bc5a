"""``python -m qio``."""

from qio.cli import main

raise SystemExit(main())
