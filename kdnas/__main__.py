import sys

from kdnas.cli import main

sys.exit(main())
