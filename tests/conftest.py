import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "ksa_official"
# `tests.torch_reference`, `tests.metal_emu` import as a package from the repo root.
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def official_fixture():
    path = FIXTURES / "gqa_shared"
    if not path.is_dir():
        pytest.fail(f"official fixture missing at {path} (shared/ must sit beside the checkout)")
    return path
