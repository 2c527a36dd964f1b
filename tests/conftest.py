import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The shared fixture beside the checkout wins (it may hold newer outputs);
# the copy in tests/fixtures keeps a lone clone of the repository testable.
FIXTURES = next(p for p in (ROOT.parent / "shared" / "fixtures" / "ksa_official",
                            ROOT / "tests" / "fixtures" / "ksa_official", None)
                if p is None or (p / "gqa_shared").is_dir())
# `tests.torch_reference`, `tests.metal_emu` import as a package from the repo root.
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def official_fixture():
    if FIXTURES is None:
        pytest.fail("official fixture missing: neither ../shared/fixtures/ksa_official nor tests/fixtures/ksa_official")
    return FIXTURES / "gqa_shared"
