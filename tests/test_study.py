"""The blind A/B study: tally (Table 3), SQLite durability under threads, the Flask app through its test client,
and its integrity rules: votes only for pairs shown to that annotator, unservable pairs left out, CSRF tokens,
one-line CLI errors."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import threading

import pandas as pd
import pytest

from revsd import study
from revsd.images import list_images

LEAK = re.compile(r"original|\bours\b", re.IGNORECASE)


@pytest.fixture()
def pairs(tmp_path, sample_dir):
    """A generate-style manifest over real sample images: each pair shows two different real images."""
    files = list_images(sorted((sample_dir / "images").iterdir()))[:8]
    out = tmp_path / "gen"
    rows = []
    for i in range(4):
        pid = f"p{i:05d}"
        row = {"pair_id": pid, "prompt": f"prompt number {i} <b>bold</b>", "seed": i}
        for side, src in (("original", files[2 * i]), ("ours", files[2 * i + 1])):
            dst = out / "pairs" / pid / f"{side}{src.suffix}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
            row[side] = str(dst.relative_to(out))
        rows.append(row)
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out / "manifest.jsonl"


def make_client(manifest, db, **kw):
    app = study.create_app(manifest, db, **kw)
    app.testing = True
    return app.test_client()


def csrf(client, url="/"):
    """The CSRF token of the form on the page at ``url`` (what a browser would send back)."""
    return re.search(r'name="csrf" value="([^"]+)"', client.get(url).get_data(as_text=True)).group(1)


def login(client, name):
    r = client.post("/login", data={"name": name, "csrf": csrf(client)})
    assert r.status_code == 302
    return client


def vote(client, pair_id, choice):
    """Show the pair's page (as a browser does), then post the vote with the page's token."""
    return client.post(f"/pair/{pair_id}/vote", data={"choice": choice, "csrf": csrf(client, f"/pair/{pair_id}")})


def shown_vote(db, name, pair_id, choice):
    with db.connect() as con:
        db.order(con, name, pair_id)  # what serving the pair's page does
    return db.vote(name, pair_id, choice)


def side_of(manifest, client, pair_id, position):
    """Which model the served image is, found by comparing bytes with the files on disk."""
    client.get(f"/pair/{pair_id}")  # images are served for pairs whose page was shown
    body = client.get(f"/image/{pair_id}/{position}").data
    row = study.load_manifest(manifest)[pair_id]
    sides = [s for s in study.SIDES if (manifest.parent / row[s]).read_bytes() == body]
    assert len(sides) == 1
    return sides[0]


# ---------------------------------------------------------------- tally

def test_tally_matches_a_hand_count():
    votes = pd.DataFrame(
        [("ann", "p1", "ours"), ("ann", "p2", "ours"), ("ann", "p3", "original"), ("ann", "p4", "undecided"),
         ("bob", "p1", "ours"), ("bob", "p2", "original"), ("bob", "p3", "original"), ("bob", "p4", "undecided"),
         ("cid", "p1", "ours"), ("cid", "p2", "ours"), ("cid", "p3", "original")],  # cid skipped p4
        columns=["annotator", "pair_id", "answer"])
    t = study.tally(votes)
    # by hand: ann 2/1/1, bob 1/2/1, cid 2/1/0; all three agree on p1 (ours) and p3 (original); p4 lacks cid
    assert t.loc["ann"].tolist() == [2, 1, 1, 4]
    assert t.loc["bob"].tolist() == [1, 2, 1, 4]
    assert t.loc["cid"].tolist() == [2, 1, 0, 3]
    assert t.loc["all agree"].tolist() == [1, 1, 0, 3]
    assert t.loc["average"].tolist() == pytest.approx([5 / 3, 4 / 3, 2 / 3, 11 / 3], abs=0.01)
    md = study.to_markdown(t)
    assert md.splitlines()[0] == "| annotator | ours | original | undecided | pairs judged |"
    assert "| all agree | 1 | 1 | 0 | 3 |" in md


def test_tally_cli_writes_markdown_and_csv(tmp_path):
    db = study.StudyDB(tmp_path / "s.sqlite")
    for name, pid, choice in [("ann", "p1", "first"), ("ann", "p2", "undecided"), ("bob", "p1", "first")]:
        shown_vote(db, name, pid, choice)
    with db.connect() as con:
        first = dict(con.execute("SELECT annotator || pair_id, first FROM orders").fetchall())
    out = tmp_path / "tally"
    assert study.main(["tally", "--db", str(tmp_path / "s.sqlite"), "--out", str(out)]) == 0
    csv = pd.read_csv(out / "tally.csv", index_col=0)
    assert csv.loc["ann", first["annp1"]] == 1 and csv.loc["ann", "undecided"] == 1
    assert csv.loc["bob", first["bobp1"]] == 1 and csv.loc["bob", "pairs"] == 1
    assert "| annotator |" in (out / "tally.md").read_text()


# ---------------------------------------------------------------- storage

def test_concurrent_votes_are_all_kept(tmp_path):
    db = study.StudyDB(tmp_path / "s.sqlite")
    names, pids = [f"a{i}" for i in range(8)], [f"p{j}" for j in range(15)]
    with db.connect() as con:
        for name, pid in [(n, p) for n in names for p in pids] + [("shared", "p0")]:
            db.order(con, name, pid)  # every pair shown first
    errors = []

    def worker(name):
        try:
            for pid in pids:
                db.vote(name, pid, "first")
                db.vote("shared", "p0", "second")  # every thread hammers one (annotator, pair)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    votes = study.StudyDB(tmp_path / "s.sqlite").votes()  # a fresh handle: the votes are on disk
    assert len(votes) == len(names) * len(pids) + 1
    assert not votes.duplicated(["annotator", "pair_id"]).any()
    with db.connect() as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_vote_answer_follows_the_stored_order(tmp_path):
    db = study.StudyDB(tmp_path / "s.sqlite")
    with db.connect() as con:
        first, second = db.order(con, "ann", "p1")
        assert db.order(con, "ann", "p1") == (first, second)  # drawn once
    assert {first, second} == set(study.SIDES)
    assert db.vote("ann", "p1", "second") == second
    assert db.vote("ann", "p1", "first") == first  # a new vote replaces the old one
    assert db.votes()[["annotator", "pair_id", "answer"]].values.tolist() == [["ann", "p1", first]]
    with pytest.raises(ValueError):
        db.vote("ann", "p1", "ours")


# ---------------------------------------------------------------- web app

def test_sides_are_random_but_fixed_per_annotator(pairs, tmp_path):
    db = tmp_path / "s.sqlite"
    ann = login(make_client(pairs, db), "ann")
    pids = list(study.load_manifest(pairs))
    seen = {p: side_of(pairs, ann, p, 1) for p in pids}
    assert all(side_of(pairs, ann, p, 2) != seen[p] for p in pids)  # the two positions show both models
    again = login(make_client(pairs, db), "ann")  # reload / new session / restarted app
    assert {p: side_of(pairs, again, p, 1) for p in pids} == seen
    # the order is drawn per annotator: across a few annotators both orders occur
    firsts = {side_of(pairs, login(make_client(pairs, db), f"u{i}"), p, 1) for i in range(6) for p in pids}
    assert firsts == set(study.SIDES)


def test_votes_persist_and_map_to_models(pairs, tmp_path):
    db = tmp_path / "s.sqlite"
    c = login(make_client(pairs, db), "ann")
    r = c.get("/")
    assert r.status_code == 302 and r.headers["Location"].endswith("/pair/p00000")
    expected = {}
    for pid, choice in [("p00000", "first"), ("p00001", "second"), ("p00002", "undecided")]:
        assert vote(c, pid, choice).status_code == 302
        expected[pid] = {"first": side_of(pairs, c, pid, 1), "second": side_of(pairs, c, pid, 2),
                         "undecided": "undecided"}[choice]
    assert c.get("/").headers["Location"].endswith("/pair/p00003")  # next unanswered pair
    page = c.get("/pair/p00001").get_data(as_text=True)
    assert re.search(r'value="second" class="choice chosen"', page)  # the saved answer is shown
    votes = study.StudyDB(db).votes()  # read back from disk by a new handle
    assert dict(zip(votes["pair_id"], votes["answer"])) == expected
    vote(c, "p00003", "first")
    assert "Thank you" in c.get("/").get_data(as_text=True)


def test_bad_requests_are_rejected(pairs, tmp_path):
    anon = make_client(pairs, tmp_path / "s.sqlite")
    token = csrf(anon)
    assert anon.get("/image/p00000/1").status_code == 403
    assert anon.post("/pair/p00000/vote", data={"choice": "first", "csrf": token}).status_code == 403
    assert anon.post("/login", data={"name": "<script>", "csrf": token}).status_code == 400
    c = login(make_client(pairs, tmp_path / "s.sqlite"), "ann")
    token = csrf(c, "/pair/p00000")
    assert c.get("/pair/nope").status_code == 404
    assert c.get("/image/nope/1").status_code == 404
    assert c.get("/image/p00000/3").status_code == 404
    assert c.post("/pair/nope/vote", data={"choice": "first", "csrf": token}).status_code == 404
    assert c.post("/pair/p00000/vote", data={"choice": "ours", "csrf": token}).status_code == 400
    assert study.StudyDB(tmp_path / "s.sqlite").votes().empty


def test_no_path_traversal(pairs, tmp_path):
    secret = pairs.parent.parent / "secret.png"
    secret.write_bytes(b"\x89PNG secret")
    c = login(make_client(pairs, tmp_path / "s.sqlite"), "ann")
    for url in ["/image/..%2Fsecret.png/1", "/image/../../secret.png", "/image/p00000/..%2F..%2Fsecret.png",
                "/image/%2e%2e/1", "/static/..%2F..%2Fstudy.py", "/image/p00000/1/../../../secret.png"]:
        r = c.get(url)
        assert r.status_code in (404, 308) and b"secret" not in r.data, url
    # even a tampered manifest cannot point outside the image root
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    rows[0]["original"] = rows[0]["ours"] = "../secret.png"
    tampered = pairs.with_name("tampered.jsonl")
    tampered.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = login(make_client(tampered, tmp_path / "t.sqlite"), "ann")
    assert c.get("/image/p00000/1").status_code == 404


def test_pages_never_reveal_the_models(pairs, tmp_path):
    c = make_client(pairs, tmp_path / "s.sqlite")
    texts = [c.get("/").get_data(as_text=True)]
    login(c, "ann")
    for pid in study.load_manifest(pairs):
        page = c.get(f"/pair/{pid}")
        texts.append(page.get_data(as_text=True))
        srcs = re.findall(r'src="([^"]+)"', texts[-1])
        assert srcs == [f"/image/{pid}/1", f"/image/{pid}/2"]
        img = c.get(srcs[0])
        assert img.mimetype == "image/jpeg" and "Content-Disposition" not in img.headers
        assert not LEAK.search(json.dumps(dict(img.headers)))
        texts.append(vote(c, pid, "undecided").headers["Location"])
    texts.append(c.get("/").get_data(as_text=True))
    assert all(not LEAK.search(t) for t in texts)
    assert 'alt="Image 1"' in texts[1] and "&lt;b&gt;bold&lt;/b&gt;" in texts[1]  # prompts are escaped


def test_token_list_restricts_annotators(pairs, tmp_path):
    c = make_client(pairs, tmp_path / "s.sqlite", annotators=["tok-7f3a"])
    assert c.post("/login", data={"name": "mallory", "csrf": csrf(c)}).status_code == 400
    login(c, "tok-7f3a")
    assert c.get("/pair/p00000").status_code == 200


def test_serve_cli_builds_the_app_with_its_options(pairs, monkeypatch):
    import flask

    seen = {}

    def fake_run(app, host, port, threaded):
        seen.update(host=host, port=port, threaded=threaded, client=app.test_client())

    monkeypatch.setattr(flask.Flask, "run", fake_run)
    assert study.main(["serve", "--pairs", str(pairs), "--port", "8123", "--annotators", "t1, t2",
                       "--question", "Which image is more beautiful?"]) == 0
    assert (seen["host"], seen["port"], seen["threaded"]) == ("127.0.0.1", 8123, True)
    assert (pairs.parent / "study.sqlite").exists()  # default db next to the manifest
    c = seen["client"]
    assert "Which image is more beautiful?" in c.get("/").get_data(as_text=True)
    assert c.post("/login", data={"name": "t3", "csrf": csrf(c)}).status_code == 400
    login(c, "t2")
    assert "Which image is more beautiful?" in c.get("/pair/p00000").get_data(as_text=True)


# ---------------------------------------------------------------- integrity (issue 14, item 7)

def test_votes_only_for_pairs_shown_to_that_annotator(pairs, tmp_path):
    db = tmp_path / "s.sqlite"
    ann, bob = login(make_client(pairs, db), "ann"), login(make_client(pairs, db), "bob")
    token = csrf(ann, "/pair/p00000")  # ann has seen p00000 only
    assert ann.post("/pair/p00002/vote", data={"choice": "first", "csrf": token}).status_code == 409
    assert ann.get("/image/p00002/1").status_code == 404  # nor its images
    vote(bob, "p00002", "first")  # shown to bob, not to ann: still refused for ann
    assert ann.post("/pair/p00002/vote", data={"choice": "first", "csrf": token}).status_code == 409
    assert ann.post("/pair/p00000/vote", data={"choice": "second", "csrf": token}).status_code == 302
    votes = study.StudyDB(db).votes()
    assert sorted(zip(votes["annotator"], votes["pair_id"])) == [("ann", "p00000"), ("bob", "p00002")]
    assert study.tally(votes).loc["ann", "pairs"] == 1  # the refused vote is not in Table 3
    with pytest.raises(study.NotShown):
        study.StudyDB(db).vote("ann", "p00003", "first")


def test_unservable_pairs_are_left_out_with_a_warning(pairs, tmp_path, capsys):
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    (pairs.parent / rows[1]["ours"]).unlink()  # p00001: a missing image
    rows[2]["original"] = "../outside.png"  # p00002: outside the image root
    (pairs.parent.parent / "outside.png").write_bytes((pairs.parent / rows[0]["ours"]).read_bytes())
    broken = pairs.with_name("broken.jsonl")
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = login(make_client(broken, tmp_path / "s.sqlite"), "ann")
    err = capsys.readouterr().err
    assert "2 pair(s) left out" in err and "p00001" in err and "p00002" in err and "p00000" not in err
    token = csrf(c, "/pair/p00000")
    for pid in ("p00001", "p00002"):
        assert c.get(f"/pair/{pid}").status_code == 404
        assert c.post(f"/pair/{pid}/vote", data={"choice": "first", "csrf": token}).status_code == 404
    for pid in ("p00000", "p00003"):  # the servable pairs, in order, then done
        assert c.get("/").headers["Location"].endswith(f"/pair/{pid}")
        assert vote(c, pid, "first").status_code == 302
    assert "all 2 pairs" in c.get("/").get_data(as_text=True)
    assert set(study.StudyDB(tmp_path / "s.sqlite").votes()["pair_id"]) == {"p00000", "p00003"}
    rows = [{**r, "ours": "missing.png"} for r in rows]
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(study.StudyError, match="no pair of the manifest has two servable images"):
        study.create_app(broken, tmp_path / "t.sqlite")


def test_forms_need_the_session_csrf_token(pairs, tmp_path):
    db = tmp_path / "s.sqlite"
    c = login(make_client(pairs, db), "ann")
    other = login(make_client(pairs, db), "bob")
    page = c.get("/pair/p00000").get_data(as_text=True)
    assert page.count('name="csrf"') == 2  # the vote form and the sign-out form
    for data in ({"choice": "first"}, {"choice": "first", "csrf": "forged"},
                 {"choice": "first", "csrf": csrf(other, "/pair/p00000")}):  # another session's token
        assert c.post("/pair/p00000/vote", data=data).status_code == 400
    assert make_client(pairs, db).post("/login", data={"name": "eve"}).status_code == 400
    assert c.post("/logout").status_code == 400 and c.get("/").status_code == 302  # still signed in
    assert study.StudyDB(db).votes().empty
    assert vote(c, "p00000", "first").status_code == 302


def test_cli_errors_are_one_line_with_exit_2(pairs, tmp_path, capsys):
    not_db = tmp_path / "notes.txt"
    not_db.write_text("hello")
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE t (x)")
    before = other.read_bytes()
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"pair_id": "p1", "prompt": \n')
    no_cols = tmp_path / "cols.csv"
    no_cols.write_text("pair_id,prompt\np1,a cat\n")
    cases = [(["tally", "--db", str(tmp_path / "missing.sqlite")], "not found"),
             (["tally", "--db", str(not_db)], "not an SQLite database"),
             (["tally", "--db", str(other)], "no 'votes' table"),
             (["serve", "--pairs", str(bad_json)], "cannot read the manifest"),
             (["serve", "--pairs", str(no_cols)], "missing column"),
             (["serve", "--pairs", str(tmp_path / "none.jsonl")], "not found"),
             (["serve", "--pairs", str(tmp_path)], "must be .jsonl or .csv"),
             (["serve", "--pairs", str(pairs), "--db", str(not_db)], "not a usable study database")]
    for argv, message in cases:
        assert study.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert other.read_bytes() == before and not_db.read_text() == "hello"  # never changed by a tally
