import sys

from dtacq_ioc.cli import main

sys.exit(main())
