import sys

from headvis_core.cli import main

sys.exit(main())
