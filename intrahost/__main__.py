import sys

from intrahost.cli import main

sys.exit(main())
