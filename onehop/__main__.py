import sys

from onehop.cli import main

sys.exit(main())
