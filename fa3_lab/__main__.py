import sys

from fa3_lab.cli import main

sys.exit(main())
