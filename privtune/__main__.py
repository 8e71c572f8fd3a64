from privtune.launch.cli import main

raise SystemExit(main())
