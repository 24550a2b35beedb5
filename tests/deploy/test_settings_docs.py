"""docs/deploy.md's settings table against the Settings model: every setting is documented, and
every numeric default the table states is the model's."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import Settings

DOCS = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
ROW = re.compile(r"^\| (`UNDIFFUSE_[A-Z0-9_]+`(?: / `_[A-Z0-9_]+`)*) \| ([^|]*) \|", re.M)
NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def _rows() -> dict[str, str]:
    """{setting name: its documented default}. A row `UNDIFFUSE_S3_BUCKET` / `_REGION` | x / y
    shortens the second name: it is the first name's leading words and the shown suffix
    (S3_REGION), or the suffix itself (`_MAX_STEPS`), whichever is a setting."""
    fields = set(Settings.model_fields)
    rows: dict[str, str] = {}
    for names, defaults in ROW.findall(DOCS):
        parts = [n.strip("` ") for n in names.split(" / ")]
        values = [v.strip() for v in defaults.split(" / ")]
        words = parts[0].removeprefix("UNDIFFUSE_").lower().split("_")
        for i, part in enumerate(parts):
            if i == 0:
                name = "_".join(words)
            else:
                suffix = part.lstrip("_").lower()
                candidates = [suffix] + ["_".join(words[:k] + [suffix]) for k in range(1, len(words))]
                name = next((c for c in candidates if c in fields), suffix)
            rows[name] = values[i] if len(values) == len(parts) else values[0]
    return rows


def test_every_setting_has_a_row():
    rows = _rows()
    missing = [name for name in Settings.model_fields if name not in rows]
    assert not missing, f"docs/deploy.md has no row for {missing}"


def test_numeric_defaults_in_the_table_are_the_models():
    rows = _rows()
    checked = 0
    for name, field in Settings.model_fields.items():
        documented = rows.get(name, "")
        if isinstance(field.default, bool) or not isinstance(field.default, int | float):
            continue
        match = NUMBER.fullmatch(documented.replace(",", ""))
        assert match, f"{name}: the table says {documented!r}, the model {field.default}"
        assert float(match.group()) == float(field.default), (name, documented, field.default)
        checked += 1
    assert checked >= 30  # the table is parsed, not skipped
