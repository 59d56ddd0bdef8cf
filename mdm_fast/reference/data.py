"""Where the public reference cases are: ``shared/reference`` (``golden/`` cases made by the public code,
``ml-mdm-configs/`` the public YAMLs, ``BASELINE.md``). The tests and benchmarks read them from inside
the checkout (where the device tool carries a ``shared/`` folder) or from beside it (a developer's and
CI's layout); ``MDM_FAST_REFERENCE`` names another folder."""
from __future__ import annotations

import os
from pathlib import Path


def reference_dir() -> Path:
    """$MDM_FAST_REFERENCE where it is set; else the first of <checkout>/shared/reference and
    <checkout>/../shared/reference that exists (else the last). A missing one is named by whoever reads it."""
    if os.environ.get("MDM_FAST_REFERENCE"):
        return Path(os.environ["MDM_FAST_REFERENCE"])
    checkout = Path(__file__).resolve().parents[2]
    candidates = [checkout / "shared" / "reference", checkout.parent / "shared" / "reference"]
    return next((c for c in candidates if c.is_dir()), candidates[-1])
