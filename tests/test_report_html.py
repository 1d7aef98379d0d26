"""The HTML report in a real browser (Playwright driving the system's chromium, as .ci/run installs it).

The page must load with no console error, show one table row per row of the plan (a run of identical
blocks is one row with its count), expand a row into its collectives, switch between prefill and
decode, and carry everything inline. The screenshot of PaLM 540B's low-latency decode plan is the one
the README shows (docs/report-palm-540b-decode.png).
"""

import re
import shutil
from pathlib import Path

import pytest

import shardwise
from shardwise.errors import ShardwiseError
from shardwise.report.html import SHOWN_CANDIDATES, render_html, write_html
from shardwise.report.phases import plan_pair
from shardwise.report.views import explained

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed: .ci/run installs it with apt-get (apt-get install chromium)"
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, path: Path):
    """The page at `path` and the list its console errors (and uncaught exceptions) are collected in."""
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, errors, requests


@pytest.fixture(scope="module")
def palm_decode():
    return shardwise.plan("palm-540b", chips=64, phase="decode", batch=64, seq=1, context=2048, weight_dtype="int8")


def test_palm_540b_decode_report(browser, palm_decode, tmp_path):
    """Would catch: a script error, a row per block instead of per run, a row that does not expand, a
    chart that loses candidates, a page that fetches anything, and a stale README screenshot."""
    plan = palm_decode
    path = write_html(plan, tmp_path / "plan.html")
    page, errors, requests = open_page(browser, path)
    rows = page.locator("section.plan tr.layer")
    assert rows.count() == len(plan.layers)
    assert page.locator("section.plan tr.layer .count").all_inner_texts() == [f"×{l.count}" for l in plan.layers
                                                                              if l.count > 1]
    attn = rows.nth(1)
    detail = page.locator("section.plan tr.detail").nth(1)
    assert not detail.is_visible() and attn.get_attribute("aria-expanded") == "false"
    attn.click()
    assert detail.is_visible() and attn.get_attribute("aria-expanded") == "true"
    assert detail.locator("table.inner tr").count() >= len(plan.layers[1].collectives) + 1
    assert "all-to-all" in detail.inner_text()  # attention by batch: the all-to-all in and out
    timed = [c for c in explained(plan).candidates if not c.refused]
    assert page.locator(".cand-top g.candidate").count() == SHOWN_CANDIDATES
    page.click("button.show-all")
    assert page.locator(".cand-all").is_visible() and page.locator(".cand-all g.candidate").count() == len(timed)
    assert page.locator("svg.mesh rect").count() >= 64  # one square per chip (and the legend's)
    assert "32.0 GiB" in page.locator("svg.memory").text_content()
    rows.nth(1).click()  # fold it again, for the screenshot
    page.evaluate("window.scrollTo(0, 0)")
    page.mouse.move(0, 0)  # no row highlighted by the pointer
    page.screenshot(path=str(DOCS / "report-palm-540b-decode.png"), full_page=False)
    assert not errors, errors
    assert all(u.startswith("file:") for u in requests), f"the report fetched {requests}"


def test_both_phases_switch_and_cache_bridge(browser, tmp_path):
    """Would catch: the phase buttons not hiding the other phase, and a missing KV-cache redistribution
    (prefill splits ref-tiny's cache by heads, decode by batch: an all-to-all per cache and block)."""
    pair = plan_pair("ref-tiny", mesh="1x1x4", batch=4, prompt=8, context=12, prefill_layouts="attn=heads",
                     decode_layouts="attn=batch")
    assert [s.record.kind for s in pair.bridge] == ["all_to_all", "all_to_all"]
    assert all(s.blocks == 2 for s in pair.bridge)
    path = write_html(pair, tmp_path / "pair.html")
    page, errors, _ = open_page(browser, path)
    pre, dec = page.locator("section.plan[data-phase=prefill]"), page.locator("section.plan[data-phase=decode]")
    assert pre.is_visible() and dec.is_visible()  # side by side at first
    assert pre.locator("tr.layer").count() == len(pair.prefill.layers)
    assert dec.locator("tr.layer").count() == len(pair.decode.layers)
    page.click(".switch button[data-show=decode]")
    assert dec.is_visible() and not pre.is_visible()
    page.click(".switch button[data-show=prefill]")
    assert pre.is_visible() and not dec.is_visible()
    page.click(".switch button[data-show=both]")
    assert pre.is_visible() and dec.is_visible()
    bridge = page.locator("section.bridge").inner_text()
    assert bridge.count("all-to-all(z)") == 2 and "×2" in bridge
    assert not errors, errors


def test_report_is_self_contained(palm_decode):
    """Would catch: a stylesheet, script, font or image loaded from anywhere at view time."""
    text = render_html(palm_decode)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "@import" not in text and "url(" not in text
    assert text.count("<script>") == 1 and "<style>" in text


def test_report_errors_name_what_to_do(palm_decode, tmp_path):
    with pytest.raises(ShardwiseError, match="ending in .html"):
        write_html(palm_decode, tmp_path / "plan.txt")
    with pytest.raises(ShardwiseError, match="expected a writable file"):
        write_html(palm_decode, tmp_path / "missing" / "plan.html")
    with pytest.raises(ShardwiseError, match="one prefill and one decode"):
        render_html([palm_decode, palm_decode])
    bad = shardwise.Plan.from_json(palm_decode.to_json())
    bad.explain = bad.explain + ["something else"]
    with pytest.raises(ShardwiseError, match="not in the format"):
        render_html(bad)


def test_explained_matches_the_planner(palm_decode):
    """Would catch the parser dropping candidates: every explain line of the chosen mesh is one record."""
    ex = explained(palm_decode)
    lines = palm_decode.explain
    start, end = 1, lines.index("other meshes (best candidate):")
    assert len(ex.candidates) == end - start and len(ex.meshes) == len(lines) - end - 1
    assert ex.mesh == str(palm_decode.mesh) and ex.blocks == 118
    assert [c.name for c in ex.candidates if c.chosen] == ["ws2d+batch"]
    losers = [c for c in ex.candidates if not c.chosen and not c.refused and c.verdict != "tie"]
    assert losers and all(c.part in ("compute", "memory", "comm") for c in losers)
