import sys

from blindsr.cli.main import main

sys.exit(main())
