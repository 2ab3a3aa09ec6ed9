import sys

from sparsesr.cli import main

sys.exit(main())
