"""Where the tests find things: the repository, and the shared reference data beside it."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: shared/data sits beside the repository (CI clones it next to shared/); FERRY_SHARED_DATA overrides.
SHARED_DATA = os.environ.get("FERRY_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))
LOPQ_DATA = os.path.join(SHARED_DATA, "lopq")
