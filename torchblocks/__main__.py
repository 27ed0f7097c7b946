import sys

from torchblocks.cli import main

sys.exit(main())
