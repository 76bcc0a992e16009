"""The README's configuration table names every setting there is (and nothing that is not)."""

from __future__ import annotations

import re
from pathlib import Path

from broker.core.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"
# a row: | `GOVBROKER_A_B` | or | `GOVBROKER_A_B` / `_C` | (a suffix replacing as many of the
# first name's last words as it has), or | `GOVBROKER_A` / `GOVBROKER_B` |
ROW = re.compile(r"^\| `(GOVBROKER_[A-Z0-9_]+)`(?: / `(_?[A-Z0-9_]+)`)?", re.MULTILINE)


def documented() -> set[str]:
    names: set[str] = set()
    for first, second in ROW.findall(README.read_text("utf-8")):
        names.add(first)
        if second.startswith("GOVBROKER_"):
            names.add(second)
        elif second:
            names.add(first.rsplit("_", second.count("_"))[0] + second)
    return names


def test_every_setting_is_in_the_readmes_configuration_table() -> None:
    settings = {f"GOVBROKER_{name.upper()}" for name in Settings.model_fields}
    assert sorted(settings - documented()) == []
    assert sorted(documented() - settings) == []
