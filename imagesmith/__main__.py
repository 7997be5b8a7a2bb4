from imagesmith.cli import main

raise SystemExit(main())
