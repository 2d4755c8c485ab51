"""``python -m tests.chsim --api-socket path=...``: run the simulator as a fake cloud-hypervisor."""

import sys

from .server import main

sys.exit(main())
