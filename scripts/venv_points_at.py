"""Exit 0 when the `cycle` package this Python imports is the one in the clone given as argv[1], else 1.

Run it with `python -P` from another folder (bootstrap.sh does): otherwise the current directory's
`cycle/` would be imported and the check would pass whatever the venv points at.
"""

import os
import sys

try:
    import cycle
except ImportError:
    sys.exit(1)
here = os.path.realpath(sys.argv[1])
sys.exit(0 if os.path.realpath(os.path.dirname(os.path.dirname(cycle.__file__))) == here else 1)
