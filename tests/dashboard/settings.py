"""Settings of the ASGI server the browser tests start: the project's, with the test URL map."""

import os

from sandbox_site.settings import *  # noqa: F403

ROOT_URLCONF = "tests.dashboard.urls"

# Console recordings of the server under test go where the test says (a temp dir).
SANDBOX_CONSOLE_DIR = os.environ.get("SANDBOX_CONSOLE_DIR") or DATA_DIR / "console"  # noqa: F405
