"""Names the wire messages share with the modules that act on them, kept free of torch: a
ClientApp process that only answers a bundle-part or key-exchange message (Flower starts a fresh
one per message) then never pays torch's import, which is seconds on a small machine."""

from __future__ import annotations

import re

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
DP_MODES = ("local", "distributed")
