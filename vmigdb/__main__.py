from vmigdb.cli import main

raise SystemExit(main())
