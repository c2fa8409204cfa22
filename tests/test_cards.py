"""The shipped model cards against the results records they are built from (`benchmarks/cards.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

from kvshrink import zoo

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_cards_are_what_their_records_give():
    """Every shipped card (recipe, compute, accuracy with n and intervals, diagnostics) and its `kvshrink models`
    headline equal what `benchmarks/cards.py` builds from docs/results: no figure in a card is typed by hand, so
    none can go stale against its records."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cards

    built = cards.build()
    assert set(built) == set(zoo.adapter_names())
    wrong = cards.differences(built)
    assert not wrong, f"{wrong}: rebuild them with python benchmarks/cards.py"
    for name, (card, headline) in built.items():
        assert "## Licence and intended use" in card and "## How it was made" in card and "Compute: " in card, name
        assert "Not measured yet" not in card and headline, name
