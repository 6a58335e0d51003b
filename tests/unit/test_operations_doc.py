"""docs/operations.md lists every setting of service/settings.py with its real default."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| `([A-Z0-9_]+)` \| ([^|]+) \|")


def setting_fields(
    model: type[BaseModel] = Settings, prefix: str = "DISTILL_"
) -> dict[str, FieldInfo]:
    """Each environment variable and the field it sets (nested groups joined with `__`)."""
    found: dict[str, FieldInfo] = {}
    for name, info in model.model_fields.items():
        if isinstance(info.validation_alias, str):
            found[info.validation_alias] = info
            continue
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found |= setting_fields(annotation, f"{prefix}{name.upper()}__")
        else:
            found[f"{prefix}{name.upper()}"] = info
    return found


def _as_documented(value: Any) -> str:
    """A default as the table writes it."""
    if value is None:
        return "unset"
    if value == "" or value == []:
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Enum):
        return f"`{value.value}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def _documented() -> dict[str, str]:
    rows = {}
    for line in (REPO / "docs" / "operations.md").read_text().splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = match.group(2).strip()
    return rows


def test_every_setting_is_documented_with_its_default() -> None:
    documented = _documented()
    fields = setting_fields()
    assert set(fields) - set(documented) == set(), "settings missing from docs/operations.md"
    assert set(documented) - set(fields) == set(), "docs/operations.md lists unknown settings"
    for variable, info in fields.items():
        default = info.get_default(call_default_factory=True)
        assert documented[variable] == _as_documented(default), variable


def test_docs_link_only_to_files_a_clone_has() -> None:
    """The README and docs/ link to files of the repository, never to ../shared or beyond."""
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"^[a-z]+://", target):
                continue
            assert (page.parent / target).resolve().is_relative_to(REPO), (page.name, target)
            assert (page.parent / target).exists(), (page.name, target)
