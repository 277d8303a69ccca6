"""`xsk-broker policy check FILE USER` through its entry point; exits with its status."""

import sys

from xsk_broker.policycheck import main

sys.exit(main(*sys.argv[1:]))
