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

from api_page import write_or_check  # noqa: E402  (scripts/, the script's own folder)

from invariance import Report  # noqa: E402

PAGE = ROOT / "docs" / "report-schema.md"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/report-schema.md is out of date")
    a = p.parse_args()
    return write_or_check(PAGE, Report.schema_markdown(), a.check, "scripts/report_schema.py")


if __name__ == "__main__":
    sys.exit(main())
