"""End to end in a real headless browser: Playwright driving Debian's chromium against the study app (votes
through the real forms with their CSRF tokens; forged and never-shown votes refused)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pandas as pd
import pytest

from revsd import study
from test_study import pairs  # noqa: F401  (fixture: a manifest over real sample images)

CHROMIUM = Path("/usr/bin/chromium")
REQUIRED = os.environ.get("REVSD_REQUIRE_BROWSER") == "1"  # .ci/run sets it: a missing chromium fails there
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists() and not REQUIRED,
                       reason="needs Debian's chromium: apt-get install -y chromium"),
]


@pytest.fixture()
def server(pairs, tmp_path):  # noqa: F811
    from werkzeug.serving import make_server

    db = tmp_path / "study.sqlite"
    srv = make_server("127.0.0.1", 0, study.create_app(pairs, db), threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}", db
    srv.shutdown()
    thread.join(timeout=10)


def test_vote_on_two_pairs_in_chromium(server, pairs, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright
    base, db = server
    manifest = study.load_manifest(pairs)
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=str(CHROMIUM),
                                                    headless=True, args=ARGS)
        try:
            page = ctx.new_page()
            page.goto(base + "/")
            page.fill("#name", "ann")
            page.click("text=Start")
            expected = {}
            for pid, want in (("p00000", "ours"), ("p00001", "original")):
                page.wait_for_url(f"**/pair/{pid}")
                assert "ours" not in page.content().lower().replace("yours", "")
                imgs = page.locator("figure img")
                assert imgs.count() == 2
                page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
                # find the requested model's position from the bytes the browser is served
                served = [page.request.get(imgs.nth(k).evaluate("i => i.currentSrc")).body() for k in range(2)]
                truth = (pairs.parent / manifest[pid][want]).read_bytes()
                position = served.index(truth) + 1
                page.click(f"button:has-text('Image {position} is better')")
                expected[pid] = want
            page.wait_for_url("**/pair/p00002")
            page.screenshot(path=str(tmp_path / "study_page.png"), full_page=True)
            # the browser's own session: no token -> 400; a token but a pair never shown to ann -> 409
            token = page.locator("form input[name=csrf]").first.get_attribute("value")
            vote_url = base + "/pair/p00003/vote"
            assert page.request.post(vote_url, form={"choice": "first"}, max_redirects=0).status == 400
            assert page.request.post(vote_url, form={"choice": "first", "csrf": token}, max_redirects=0).status == 409
        finally:
            ctx.close()

    votes = study.StudyDB(db).votes()
    assert dict(zip(votes["pair_id"], votes["answer"])) == expected
    assert study.main(["tally", "--db", str(db), "--out", str(tmp_path / "tally")]) == 0
    table = pd.read_csv(tmp_path / "tally" / "tally.csv", index_col=0)
    assert table.loc["ann", ["ours", "original", "undecided", "pairs"]].tolist() == [1, 1, 0, 2]
