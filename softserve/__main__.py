from softserve.cli import main

raise SystemExit(main())
