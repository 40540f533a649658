"""The blind A/B study: tally (Table 3), SQLite durability under threads, the Flask app through its test client."""

from __future__ import annotations

import json
import re
import shutil
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


def login(client, name):
    r = client.post("/login", data={"name": name})
    assert r.status_code == 302
    return client


def side_of(manifest, client, pair_id, position):
    """Which model the served image is, found by comparing bytes with the files on disk."""
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
        db.vote(name, pid, choice)
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
        assert c.post(f"/pair/{pid}/vote", data={"choice": choice}).status_code == 302
        expected[pid] = {"first": side_of(pairs, c, pid, 1), "second": side_of(pairs, c, pid, 2),
                         "undecided": "undecided"}[choice]
    assert c.get("/").headers["Location"].endswith("/pair/p00003")  # next unanswered pair
    page = c.get("/pair/p00001").get_data(as_text=True)
    assert re.search(r'value="second" class="choice chosen"', page)  # the saved answer is shown
    votes = study.StudyDB(db).votes()  # read back from disk by a new handle
    assert dict(zip(votes["pair_id"], votes["answer"])) == expected
    c.post("/pair/p00003/vote", data={"choice": "first"})
    assert "Thank you" in c.get("/").get_data(as_text=True)


def test_bad_requests_are_rejected(pairs, tmp_path):
    anon = make_client(pairs, tmp_path / "s.sqlite")
    assert anon.get("/image/p00000/1").status_code == 403
    assert anon.post("/pair/p00000/vote", data={"choice": "first"}).status_code == 403
    assert anon.post("/login", data={"name": "<script>"}).status_code == 400
    c = login(make_client(pairs, tmp_path / "s.sqlite"), "ann")
    assert c.get("/pair/nope").status_code == 404
    assert c.get("/image/nope/1").status_code == 404
    assert c.get("/image/p00000/3").status_code == 404
    assert c.post("/pair/nope/vote", data={"choice": "first"}).status_code == 404
    assert c.post("/pair/p00000/vote", data={"choice": "ours"}).status_code == 400
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
        texts.append(c.post(f"/pair/{pid}/vote", data={"choice": "undecided"}).headers["Location"])
    texts.append(c.get("/").get_data(as_text=True))
    assert all(not LEAK.search(t) for t in texts)
    assert 'alt="Image 1"' in texts[1] and "&lt;b&gt;bold&lt;/b&gt;" in texts[1]  # prompts are escaped


def test_token_list_restricts_annotators(pairs, tmp_path):
    c = make_client(pairs, tmp_path / "s.sqlite", annotators=["tok-7f3a"])
    assert c.post("/login", data={"name": "mallory"}).status_code == 400
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
    assert c.post("/login", data={"name": "t3"}).status_code == 400
    login(c, "t2")
    assert "Which image is more beautiful?" in c.get("/pair/p00000").get_data(as_text=True)
