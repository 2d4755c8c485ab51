"""Every form control written out in a template has a label of its own: inside a <label>, named
by a label's ``for``, or with aria-label / aria-labelledby / title. A placeholder is not a label
(it goes when the user types). Controls rendered from Django forms (``{{ field }}``) are checked
in the browser by tests/dashboard/test_every_page.py."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTROL = re.compile(r"<(input|select|textarea)\b([^>]*)>", re.IGNORECASE)
NOT_FILLED = re.compile(r"""\btype=["']?(hidden|submit|button|reset)\b""", re.IGNORECASE)
NAMED = re.compile(r"\b(aria-label|aria-labelledby|title)=", re.IGNORECASE)
ID = re.compile(r"""\bid=["']([^"']+)["']""")


def unlabelled(html: str) -> list[str]:
    found = []
    for m in CONTROL.finditer(html):
        attrs = m.group(2)
        if NOT_FILLED.search(attrs) or NAMED.search(attrs):
            continue
        before = html[: m.start()]
        if before.rfind("<label") > before.rfind("</label>"):
            continue  # inside a <label>
        ident = ID.search(attrs)
        if ident and re.search(rf"""<label[^>]*\bfor=["']{re.escape(ident.group(1))}["']""", html):
            continue
        found.append(m.group(0)[:120])
    return found


def test_the_check_sees_a_placeholder_only_control() -> None:
    assert unlabelled('<input type="text" name="command" placeholder="uname -a">')
    assert not unlabelled('<label>Command <input type="text" name="command"></label>')
    assert not unlabelled('<select name="role" aria-label="Role of amy"></select>')
    assert not unlabelled('<label for="x">X</label><input id="x" name="x">')
    assert not unlabelled('<input type="hidden" name="force" value="on">')


def test_every_control_in_the_templates_is_labelled() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {tag}"
        for path in sorted((ROOT / "templates").rglob("*.html"))
        for tag in unlabelled(path.read_text())
    ]
    assert not offenders, offenders
