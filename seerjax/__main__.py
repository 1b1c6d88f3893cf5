from seerjax.cli import main

raise SystemExit(main())
