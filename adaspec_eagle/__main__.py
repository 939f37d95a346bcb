import sys

from adaspec_eagle.cli import main

sys.exit(main())
