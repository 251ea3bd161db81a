"""`make bench`: not built yet; the benchmark issue adds the scenarios."""

import sys

print("make bench: no scenarios yet (they arrive with the benchmark issue)")
sys.exit(0)
