import sys

from fa3_lab.lab.cli import main

sys.exit(main())
