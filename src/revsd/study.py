"""The blind A/B human study of paper §4 (Table 3): ``revsd study serve`` and ``revsd study tally``.

``serve --pairs MANIFEST`` (the ``manifest.jsonl``/``.csv`` of ``revsd generate``: pair_id, prompt, original,
ours; image paths relative to the manifest's folder) starts a Flask app. An annotator signs in with a name (or a
token handed out with ``--annotators``), sees the prompt and the two images in a random left/right order that is
drawn once per annotator and pair and stored, and answers first / second / undecided.

Blindness: pages, URLs and alt texts only say "Image 1"/"Image 2"; images are served by pair id + position
(``/image/<pair_id>/<1|2>``) resolved on the server through the stored order, from bytes (no file name, mtime or
ETag); the client never sends a path. Durability: SQLite in WAL mode with ``synchronous=FULL``, one connection per
request, one ``BEGIN IMMEDIATE`` transaction per vote, primary key (annotator, pair_id) — a second vote on a pair
replaces the first.

``tally --db study.sqlite`` prints the paper's Table 3 (votes per annotator for ours / original / undecided, the
pairs on which all annotators agree, the average) and writes ``tally.md`` + ``tally.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import random
import re
import secrets
import sqlite3
from pathlib import Path

import pandas as pd

from revsd.artifacts import save_csv, write_text

ASSETS = Path(__file__).with_name("study_assets")
SIDES = ("original", "ours")  # server side only; never rendered
CHOICES = ("first", "second", "undecided")
ANSWERS = ("ours", "original", "undecided")
PAIR_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ANNOTATOR = re.compile(r"^[\w.@ -]{1,64}$")
QUESTION = "Which image matches the prompt better?"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS orders (
    annotator TEXT NOT NULL, pair_id TEXT NOT NULL,
    first TEXT NOT NULL CHECK (first IN ('original', 'ours')),
    PRIMARY KEY (annotator, pair_id));
CREATE TABLE IF NOT EXISTS votes (
    annotator TEXT NOT NULL, pair_id TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('first', 'second', 'undecided')),
    answer TEXT NOT NULL CHECK (answer IN ('ours', 'original', 'undecided')),
    voted_at TEXT NOT NULL,
    PRIMARY KEY (annotator, pair_id));
"""


# ---------------------------------------------------------------- manifest

def load_manifest(path: str | Path) -> dict[str, dict]:
    """``{pair_id: row}`` from a ``revsd generate`` manifest (.jsonl or .csv); checks ids and columns."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pairs manifest {path} not found: run `revsd generate` first")
    if path.suffix == ".jsonl":
        df = pd.read_json(path, lines=True, dtype={"pair_id": str})
    elif path.suffix == ".csv":
        df = pd.read_csv(path, dtype={"pair_id": str})
    else:
        raise ValueError(f"{path}: the manifest must be .jsonl or .csv")
    missing = [c for c in ("pair_id", "prompt", *SIDES) if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    bad = [p for p in df["pair_id"] if not PAIR_ID.match(str(p))]
    if bad or df["pair_id"].duplicated().any():
        raise ValueError(f"{path}: pair ids must be unique and match {PAIR_ID.pattern} (bad: {bad[:3]})")
    return {str(r["pair_id"]): r for r in df.to_dict("records")}


# ---------------------------------------------------------------- storage

class StudyDB:
    """SQLite storage; a short-lived connection per use (safe across threads and processes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)

    @contextlib.contextmanager
    def connect(self):
        """An autocommit connection (explicit transactions where needed), closed on exit."""
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            con.execute("PRAGMA busy_timeout=30000")
            con.execute("PRAGMA synchronous=FULL")
            yield con
        finally:
            con.close()

    def secret(self) -> str:
        """The session-signing key, created once and kept in the database (sessions survive restarts)."""
        with self.connect() as con:
            con.execute("INSERT OR IGNORE INTO meta VALUES ('secret', ?)", (secrets.token_hex(32),))
            return con.execute("SELECT value FROM meta WHERE key='secret'").fetchone()[0]

    def order(self, con: sqlite3.Connection, annotator: str, pair_id: str) -> tuple[str, str]:
        """(first side, second side) for this annotator and pair, drawn once at random and stored."""
        con.execute("INSERT OR IGNORE INTO orders VALUES (?, ?, ?)",
                    (annotator, pair_id, random.SystemRandom().choice(SIDES)))
        first = con.execute("SELECT first FROM orders WHERE annotator=? AND pair_id=?",
                            (annotator, pair_id)).fetchone()[0]
        return (first, SIDES[1 - SIDES.index(first)])

    def vote(self, annotator: str, pair_id: str, choice: str) -> str:
        """Store (or replace) a vote in one transaction; returns the answer (ours / original / undecided)."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}")
        with self.connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                first, second = self.order(con, annotator, pair_id)
                answer = {"first": first, "second": second, "undecided": "undecided"}[choice]
                con.execute("INSERT INTO votes VALUES (?, ?, ?, ?, ?) ON CONFLICT (annotator, pair_id) DO UPDATE "
                            "SET choice=excluded.choice, answer=excluded.answer, voted_at=excluded.voted_at",
                            (annotator, pair_id, choice, answer, dt.datetime.now(dt.timezone.utc).isoformat()))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return answer

    def votes(self) -> pd.DataFrame:
        with self.connect() as con:
            return pd.read_sql_query("SELECT annotator, pair_id, choice, answer, voted_at FROM votes "
                                     "ORDER BY annotator, pair_id", con)


# ---------------------------------------------------------------- tally (paper Table 3)

def tally(votes: pd.DataFrame) -> pd.DataFrame:
    """Rows: each annotator, ``all agree`` (pairs judged by every annotator with one common answer, counted
    per answer), ``average`` (mean of the annotator rows); columns: ours, original, undecided, pairs."""
    cols = [*ANSWERS, "pairs"]
    if votes.empty:
        return pd.DataFrame(columns=cols, dtype=float)
    per = pd.crosstab(votes["annotator"], votes["answer"]).reindex(columns=list(ANSWERS), fill_value=0)
    per["pairs"] = per.sum(axis=1)
    n_annot = votes["annotator"].nunique()
    by_pair = votes.groupby("pair_id")["answer"].agg(["nunique", "size", "first"])
    agree = by_pair[(by_pair["size"] == n_annot) & (by_pair["nunique"] == 1)]["first"].value_counts()
    all_agree = {a: int(agree.get(a, 0)) for a in ANSWERS}
    all_agree["pairs"] = int((by_pair["size"] == n_annot).sum())
    table = per.astype(float)
    table.loc["all agree"] = all_agree
    table.loc["average"] = per.mean(axis=0).round(2)
    table.index.name = "annotator"
    return table


def to_markdown(table: pd.DataFrame) -> str:
    head = ["annotator", "ours", "original", "undecided", "pairs judged"]
    fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([str(i), *map(fmt, row)]) + " |" for i, row in zip(table.index, table.values)]
    return "\n".join(lines) + "\n"


def write_tally(db_path: str | Path, out_dir: str | Path | None = None) -> pd.DataFrame:
    db_path = Path(db_path)
    if not db_path.exists():
        raise FileNotFoundError(f"study database {db_path} not found: pass the --db that `revsd study serve` used")
    table = tally(StudyDB(db_path).votes())
    out = Path(out_dir or db_path.parent)
    write_text(out / "tally.md", "# Human study (paper Table 3)\n\n" + to_markdown(table))
    save_csv(out / "tally.csv", table, index=True)
    return table


# ---------------------------------------------------------------- web app

def create_app(manifest: str | Path | dict, db_path: str | Path, image_root: str | Path | None = None,
               annotators: list[str] | None = None, question: str = QUESTION):
    """The study app. ``manifest``: path or ``{pair_id: row}``; ``image_root``: folder the manifest's image
    paths are relative to (default: the manifest's folder); ``annotators``: allowed names/tokens (any if None)."""
    from flask import Flask, abort, redirect, render_template, request, send_file, session, url_for

    if isinstance(manifest, dict):
        pairs = manifest
        if image_root is None:
            raise ValueError("image_root is required when the manifest is given as a dict")
    else:
        pairs = load_manifest(manifest)
        image_root = image_root or Path(manifest).parent
    root = Path(image_root).resolve()
    order_ids = list(pairs)
    allowed = set(annotators) if annotators else None
    db = StudyDB(db_path)

    app = Flask(__name__, template_folder=str(ASSETS / "templates"), static_folder=str(ASSETS / "static"))
    app.config.update(SECRET_KEY=db.secret(), SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_HTTPONLY=True)

    def annotator() -> str:
        name = session.get("annotator")
        if not name:
            abort(403)
        return name

    def pair_or_404(pair_id: str) -> dict:
        if not PAIR_ID.match(pair_id) or pair_id not in pairs:
            abort(404)
        return pairs[pair_id]

    def done_ids(name: str) -> dict[str, str]:
        with db.connect() as con:
            return dict(con.execute("SELECT pair_id, choice FROM votes WHERE annotator=?", (name,)).fetchall())

    @app.after_request
    def no_cache(resp):
        resp.headers["Cache-Control"] = "private, no-store"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        return resp

    @app.get("/")
    def index():
        name = session.get("annotator")
        if not name:
            return render_template("login.html", error=None, token=allowed is not None, question=question)
        done = done_ids(name)
        todo = [p for p in order_ids if p not in done]
        if todo:
            return redirect(url_for("pair", pair_id=todo[0]))
        return render_template("done.html", name=name, n=len(order_ids), first=order_ids[0] if order_ids else None)

    @app.post("/login")
    def login():
        name = request.form.get("name", "").strip()
        if not ANNOTATOR.match(name) or (allowed is not None and name not in allowed):
            msg = "Unknown token." if allowed is not None else "Use 1–64 letters, digits, spaces or . _ @ -"
            return render_template("login.html", error=msg, token=allowed is not None, question=question), 400
        session.clear()
        session["annotator"] = name
        return redirect(url_for("index"))

    @app.post("/logout")
    def logout():
        session.clear()
        return redirect(url_for("index"))

    @app.get("/pair/<pair_id>")
    def pair(pair_id: str):
        if not session.get("annotator"):
            return redirect(url_for("index"))
        name, row = annotator(), pair_or_404(pair_id)
        with db.connect() as con:
            db.order(con, name, pair_id)  # draw (and store) the order before showing anything
        done = done_ids(name)
        i = order_ids.index(pair_id)
        return render_template(
            "pair.html", name=name, pair_id=pair_id, prompt=row["prompt"], question=question,
            position=i + 1, n=len(order_ids), n_done=len(done), current=done.get(pair_id),
            prev_id=order_ids[i - 1] if i > 0 else None,
            next_id=order_ids[i + 1] if i + 1 < len(order_ids) else None)

    @app.post("/pair/<pair_id>/vote")
    def vote(pair_id: str):
        name = annotator()
        pair_or_404(pair_id)
        choice = request.form.get("choice", "")
        if choice not in CHOICES:
            abort(400)
        db.vote(name, pair_id, choice)
        return redirect(url_for("index"))

    @app.get("/image/<pair_id>/<int:position>")
    def image(pair_id: str, position: int):
        name, row = annotator(), pair_or_404(pair_id)
        if position not in (1, 2):
            abort(404)
        with db.connect() as con:
            side = db.order(con, name, pair_id)[position - 1]
        path = (root / str(row[side])).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            abort(404)  # never serve outside the image root, even from a tampered manifest
        mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
        if path.suffix.lower() not in mime:
            abort(404)
        return send_file(io.BytesIO(path.read_bytes()), mimetype=mime[path.suffix.lower()], etag=False)

    app.extensions["revsd_study_db"] = db
    return app


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="revsd study", description="blind A/B human study (paper §4, Table 3)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the study page")
    s.add_argument("--pairs", required=True, help="manifest.jsonl/csv written by `revsd generate`")
    s.add_argument("--db", default=None, help="SQLite file for votes (default: study.sqlite next to the manifest)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--annotators", default=None, help="comma-separated allowed names/tokens (default: any name)")
    s.add_argument("--question", default=QUESTION)
    t = sub.add_parser("tally", help="Table 3 from the votes (Markdown + CSV)")
    t.add_argument("--db", required=True)
    t.add_argument("--out", default=None, help="folder for tally.md / tally.csv (default: the db's folder)")
    a = ap.parse_args(argv)
    if a.cmd == "tally":
        table = write_tally(a.db, a.out)
        print(to_markdown(table), end="")
        print(f"wrote tally.md, tally.csv in {Path(a.out or Path(a.db).parent)}")
        return 0
    db = a.db or Path(a.pairs).parent / "study.sqlite"
    names = [n.strip() for n in a.annotators.split(",") if n.strip()] if a.annotators else None
    app = create_app(a.pairs, db, annotators=names, question=a.question)
    print(f"study: {len(load_manifest(a.pairs))} pairs, votes in {db}; open http://{a.host}:{a.port}/")
    app.run(host=a.host, port=a.port, threaded=True)
    return 0
