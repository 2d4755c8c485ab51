"""Helpers of the browser tests that look at every page: which pages there are (from the URL
conf), a logged-in browser at a given width and colour scheme, horizontal scrolling, and axe-core
run inside the page."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

ROOT = Path(__file__).resolve().parents[2]
AXE = ROOT / "frontend" / "node_modules" / "axe-core" / "axe.min.js"

# Not the dashboard's own pages: the API (JSON and Swagger UI's page), Django's admin site (its
# own styles), probes and the static files.
SKIPPED_PREFIXES = ("/api/", "/admin/", "/static/", "/healthz", "/readyz", "/metrics")

_PARAM = re.compile(r"<(?:(?P<conv>[a-z]+):)?(?P<name>\w+)>")


def routes(urlconf: str | None = None) -> list[str]:
    """Every route of the URL conf as a path template (``/vms/<uuid:pk>/``), includes followed."""

    def walk(patterns: Iterable[Any], prefix: str) -> Iterator[str]:
        for p in patterns:
            route = str(p.pattern)
            if isinstance(p, URLResolver):
                yield from walk(p.url_patterns, prefix + route)
            elif isinstance(p, URLPattern):
                yield prefix + route

    found = []
    for route in walk(get_resolver(urlconf).url_patterns, "/"):
        if route.startswith("/^") or "(?P" in route or "\\" in route:
            continue  # regex routes (the API router's format suffixes, the admin's)
        if not route.startswith(SKIPPED_PREFIXES) and route not in found:
            found.append(route)
    return found


def fill(route: str, candidates: dict[str, list[str]]) -> Iterator[str]:
    """Concrete URLs for a route: each parameter filled from the candidates of its converter
    (uuid, int, slug, str); a route with a parameter of no candidate gives nothing."""
    params = list(_PARAM.finditer(route))
    if not params:
        yield route
        return
    m = params[0]
    for value in candidates.get(m.group("conv") or "str", []):
        yield from fill(route[: m.start()] + value + route[m.end() :], candidates)


@dataclass
class Page:
    route: str
    url: str
    status: int


def discover(client: Client, candidates: dict[str, list[str]], limit: int = 3) -> list[Page]:
    """The HTML pages this client's user may GET: every route of the URL conf, its parameters
    filled from the candidates, asked with the test client; the first filling that answers an
    HTML page is the route's page. ``<str:...>`` parameters are verbs of POST-only views and get
    no candidate unless one is given."""
    pages = []
    for route in routes():
        for url in list(fill(route, candidates))[: limit * 4]:
            response = client.get(url)
            html = response.get("Content-Type", "").startswith("text/html")
            if response.status_code == 200 and html:
                pages.append(Page(route, url, 200))
                break
    return pages


def viewport(driver: Any, width: int, height: int = 900, *, dark: bool = False) -> None:
    """A device of this width (a phone's viewport below 600 px) in the given colour scheme."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
    )
    driver.execute_cdp_cmd(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark" if dark else "light"}]},
    )


def log_in(driver: Any, base: str, user: Any) -> None:
    """The user's session cookie in the browser (no login form: each test logs in many times)."""
    client = Client()
    client.force_login(user)
    driver.get(f"{base}/healthz")
    driver.delete_all_cookies()
    driver.add_cookie({"name": "sessionid", "value": client.cookies["sessionid"].value})


OVERFLOW_JS = """
const width = document.documentElement.clientWidth;
const wide = [];
if (document.documentElement.scrollWidth > width) {
  for (const el of document.body.querySelectorAll("*")) {
    const r = el.getBoundingClientRect();
    if (r.right > width + 1 && r.width > 0) {
      let scrolled = false;
      for (let p = el.parentElement; p; p = p.parentElement) {
        const s = getComputedStyle(p);
        if (p !== document.body && p !== document.documentElement && /(auto|scroll|hidden)/.test(s.overflowX)) { scrolled = true; break; }
      }
      if (!scrolled) wide.push(`${el.tagName.toLowerCase()}${el.id ? "#" + el.id : ""}${el.className && typeof el.className === "string" ? "." + el.className.trim().split(/\\s+/).join(".") : ""} right=${Math.round(r.right)}`);
    }
  }
}
return {scrollWidth: document.documentElement.scrollWidth, width, wide: wide.slice(0, 8)};
"""


def horizontal_overflow(driver: Any) -> dict[str, Any] | None:
    """None if the page fits its viewport's width, else the widths and the widest elements."""
    got = driver.execute_script(OVERFLOW_JS)
    return None if got["scrollWidth"] <= got["width"] else got


def axe_violations(driver: Any, impacts: tuple[str, ...] = ("serious", "critical")) -> list[str]:
    """axe-core's violations of these impacts in the page as it is now, one line per node."""
    if not driver.execute_script("return typeof window.axe === 'object'"):
        driver.execute_script(AXE.read_text())
    result = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        axe.run(document, {resultTypes: ["violations"]})
          .then((r) => done(JSON.stringify(r.violations)))
          .catch((e) => done(JSON.stringify({error: String(e)})));
        """
    )
    violations = json.loads(result)
    assert isinstance(violations, list), violations
    lines = []
    for v in violations:
        if v["impact"] not in impacts:
            continue
        for node in v["nodes"]:
            lines.append(
                f"{v['id']} ({v['impact']}): {' '.join(node['target'])}: "
                f"{node.get('failureSummary', '').splitlines()[-1].strip()[:200]}"
            )
    return lines


UNLABELLED_JS = """
const out = [];
for (const el of document.querySelectorAll("input, select, textarea")) {
  if (el.type === "hidden" || el.closest("[hidden]") || el.closest(".xterm")) continue;
  const labelled = (el.labels && el.labels.length && [...el.labels].some((l) => l.textContent.trim()))
    || (el.getAttribute("aria-label") || "").trim()
    || (el.getAttribute("aria-labelledby") || "").split(/\\s+/).some((id) => id && document.getElementById(id))
    || (el.getAttribute("title") || "").trim();
  if (!labelled) out.push(`${el.tagName.toLowerCase()}[name=${el.name || ""}]${el.id ? "#" + el.id : ""}`);
}
return out;
"""


def unlabelled_controls(driver: Any) -> list[str]:
    """Form controls with no label of their own: a placeholder is not one (it goes when the user
    types, and axe-core accepts it)."""
    return list(driver.execute_script(UNLABELLED_JS))
