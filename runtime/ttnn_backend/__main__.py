import sys

from .backend import main

sys.exit(main())
