"""The report in a real browser: Debian's Chromium, headless, driven by Playwright, at a
phone's width (420 px) and a desktop's (1400 px).

Checked on the rendered page, with every ``details`` element closed and then opened:
no horizontal page overflow (``scrollWidth <= innerWidth``), no element sticking out of
the viewport except inside a table's own scrolling box, every image no wider than its
container, not upscaled, and its smallest text at least 9 px on screen (the PNG's smallest
text in pixels, from the figure's font sizes, times the shown width over the PNG's
width); the summary fits one 1400 x 900 screen without scrolling sideways, and at 420 px
it becomes one card per model that does not scroll either, while each group of figures
becomes a strip that scrolls sideways in its own box; the page loads nothing (every
request is the file itself or a ``data:`` image). Skipped when Playwright or Chromium is
missing; CI installs both (``apt-get install chromium``; ``playwright`` is in the test
extra; never ``playwright install``); with ``WRAPCAL_REQUIRE_BROWSER=1`` (CI) a missing
one fails instead.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch import nn

import wrapcal

#: CI sets WRAPCAL_REQUIRE_BROWSER=1: a missing browser then fails instead of skipping,
#: so a CI that forgot to install it cannot pass green.
REQUIRED = os.environ.get("WRAPCAL_REQUIRE_BROWSER", "") not in ("", "0")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright import sync_api
except ImportError:
    if REQUIRED:
        raise
    pytest.skip("playwright is not installed", allow_module_level=True)
if CHROMIUM is None:
    if REQUIRED:
        raise RuntimeError("WRAPCAL_REQUIRE_BROWSER is set but chromium is not installed")
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
MIN_TEXT_PX = 9.0

LAYOUT = """() => {
  const vw = window.innerWidth;
  // Tables, and figure strips on a phone, scroll sideways inside their own box.
  const scroller = (el) => {
    for (let p = el.parentElement; p; p = p.parentElement) {
      if (getComputedStyle(p).overflowX === 'auto') return p;
    }
    return null;
  };
  const inScroller = (el) => scroller(el) !== null;
  const out = [];
  for (const el of document.querySelectorAll('main *')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || inScroller(el)) continue;
    if (r.right > vw + 0.5 || r.left < -0.5) out.push(el.tagName + '.' + el.className);
  }
  const images = [...document.images].filter(i => i.getBoundingClientRect().width > 0).map(i => {
    const r = i.getBoundingClientRect(), box = i.parentElement.getBoundingClientRect();
    const strip = scroller(i);
    return {w: r.width, natural: i.naturalWidth, container: box.width, alt: i.alt,
            right: strip ? r.width : r.right,
            visible: strip ? strip.clientWidth : vw, font: parseFloat(i.dataset.minFontPx)};
  });
  const wraps = [...document.querySelectorAll('#summary .table-wrap')].map(
    w => [w.scrollWidth, w.clientWidth]);
  const summary = document.querySelector('#summary table').getBoundingClientRect();
  return {scrollWidth: document.documentElement.scrollWidth, innerWidth: vw,
          height: document.documentElement.scrollHeight, outside: out, images,
          summaryWrap: wraps[0], summaryBottom: summary.bottom + window.scrollY,
          cards: getComputedStyle(document.querySelector('#summary tbody tr')).display,
          strip: getComputedStyle(document.querySelector('.figures')).overflowX};
}"""


@pytest.fixture(scope="module")
def page_path(tmp_path_factory):
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 6)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(1600, 12, generator=gen)
    with torch.no_grad():
        y = torch.multinomial(torch.softmax(model(x) / 2, 1), 1, generator=gen)[:, 0]
    wrapped = wrapcal.wrap(model, ["temperature", "conformal", ("abstain", {"risk": 0.05})])
    wrapped.fit(calibration=(x[:800], y[:800]), progress=False)
    ood = {
        "gaussian noise, three times the scale": 3 * torch.randn(300, 12, generator=gen),
        "near: shrunk test inputs": 0.3 * x[:300],
    }
    models = {"baseline": model, "temperature + conformal + abstain (production)": wrapped}
    report = wrapcal.evaluate(models, (x[800:], y[800:]), ood, progress=False, bootstrap=50)
    return report.save(tmp_path_factory.mktemp("browser")) / "report.html"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.mark.parametrize("width", [420, 1400])
def test_layout_at_phone_and_desktop_widths(browser, page_path, width):
    page = browser.new_page(viewport={"width": width, "height": 900})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(page_path.as_uri())
    for state in ("closed", "open"):
        if state == "open":
            page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
        got = page.evaluate(LAYOUT)
        assert got["scrollWidth"] <= got["innerWidth"], (state, got["scrollWidth"])
        assert got["outside"] == [], state
        assert got["images"], "no figure shown"
        for img in got["images"]:
            assert img["w"] <= img["container"] + 0.5, img["alt"]
            assert img["w"] <= img["natural"] + 0.5, img["alt"]  # never upscaled (blurry)
            assert img["right"] <= img["visible"], img["alt"]  # whole, in view or its strip
            assert img["font"] * img["w"] / img["natural"] >= MIN_TEXT_PX, img["alt"]
        scroll, client = got["summaryWrap"]
        assert scroll <= client + 1  # the summary never scrolls sideways
        if width == 1400:
            assert got["cards"] == "table-row" and got["summaryBottom"] <= 900
        else:
            assert got["cards"] == "block"  # one card per model
            assert got["strip"] == "auto"  # figures side by side in a strip, not a column
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    page.close()


def test_figures_take_one_row_per_group_at_both_widths(browser, page_path):
    for width in (420, 1400):
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(page_path.as_uri())
        rows = page.evaluate(
            """() => [...document.querySelectorAll('.figures')].filter(g => g.offsetParent)
                 .map(g => new Set([...g.children].map(f => f.offsetTop)).size)"""
        )
        page.close()
        # The reliability diagrams and the OOD figures (4 each): one row on a phone (a
        # strip), at most two on a desktop (side by side).
        assert rows[:2] and all(r <= (1 if width == 420 else 2) for r in rows), (width, rows)
