import sys

from vmigdb.bench.run import main

sys.exit(main())
