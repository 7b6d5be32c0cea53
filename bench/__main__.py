import sys

from bench.suite import main
from xfgate.errors import XfgateError

try:
    sys.exit(main())
except XfgateError as e:
    print(f"bench: error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
