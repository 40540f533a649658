from revsd.cli import main

raise SystemExit(main())
