from meshward.cli import main

raise SystemExit(main())
