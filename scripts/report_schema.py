"""Write ``docs/report-schema.md``: the JSON layout of ``report.json``, from the record's types.

    python scripts/report_schema.py [--check]

The page is generated from the dataclasses in ``invariance/_record.py`` (their fields and the
``Attributes:`` sections of their docstrings); ``--check`` exits with status 1 when the page is
out of date (the test suite runs it), so the schema cannot drift from the code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from invariance import Report  # noqa: E402

PAGE = ROOT / "docs" / "report-schema.md"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/report-schema.md is out of date")
    a = p.parse_args()
    text = Report.schema_markdown()
    if a.check:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE} is out of date: run python scripts/report_schema.py", file=sys.stderr)
            return 1
        return 0
    from invariance.files import atomic_write_text

    atomic_write_text(PAGE, text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
