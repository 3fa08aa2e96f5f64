from mfconsole.cli import main

raise SystemExit(main())
