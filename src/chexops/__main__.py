import sys

from chexops.cli import main

sys.exit(main())
