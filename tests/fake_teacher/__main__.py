"""Entry point: `python -m tests.fake_teacher --host 127.0.0.1 --port 0 [flags]`."""

import sys

from tests.fake_teacher.server import main

sys.exit(main())
