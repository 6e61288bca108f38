import sys

from kvlayer.blend.cli import main

sys.exit(main())
