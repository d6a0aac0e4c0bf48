import sys

from vmigdb.soak.run import main

sys.exit(main())
