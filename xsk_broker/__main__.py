from xsk_broker.cli import main

raise SystemExit(main())
