import sys

from headvis_core.cli.main import main

sys.exit(main())
