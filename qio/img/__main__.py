import sys

from qio.img.cli import main

sys.exit(main())
