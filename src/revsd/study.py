"""The blind A/B human study of paper §4 (Table 3): ``revsd study serve`` and ``revsd study tally``.

``serve --pairs MANIFEST`` (the ``manifest.jsonl``/``.csv`` of ``revsd generate``: pair_id, prompt, original,
ours; image paths relative to the manifest's folder) starts a Flask app. An annotator signs in with a name (or a
token handed out with ``--annotators``), sees the prompt and the two images in a random left/right order that is
drawn once per annotator and pair and stored, and answers first / second / undecided.

Blindness: pages, URLs and alt texts only say "Image 1"/"Image 2"; images are served by pair id + position
(``/image/<pair_id>/<1|2>``) resolved on the server through the stored order, from bytes (no file name, mtime or
ETag); the client never sends a path. Integrity: votes (and images) only for pairs whose page was shown to that
annotator (serving the page draws and stores the order); pairs whose images cannot be served are left out at
start with a warning; every form carries a per-session CSRF token. Durability: SQLite in WAL mode with
``synchronous=FULL``, one connection per request, one ``BEGIN IMMEDIATE`` transaction per vote, primary key
(annotator, pair_id) — a second vote on a pair replaces the first.

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
import sys
from pathlib import Path

import pandas as pd

from revsd.artifacts import save_csv, write_text
from revsd.study_tally import ANSWERS, tally, to_markdown  # noqa: F401  (study.tally and ANSWERS are public)

ASSETS = Path(__file__).with_name("study_assets")
SIDES = ("original", "ours")  # server side only; never rendered
CHOICES = ("first", "second", "undecided")
PAIR_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ANNOTATOR = re.compile(r"^[\w.@ -]{1,64}$")
QUESTION = "Which image matches the prompt better?"
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
SQLITE_HEADER = b"SQLite format 3\x00"


class StudyError(ValueError):
    """A bad manifest, database or vote; the CLI prints it as one line and exits 2."""


class NotShown(StudyError):
    """A vote for a pair whose page was never shown to that annotator."""

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
    if path.suffix not in (".jsonl", ".csv"):
        raise StudyError(f"{path}: the manifest must be .jsonl or .csv")
    try:
        df = (pd.read_json(path, lines=True, dtype={"pair_id": str}) if path.suffix == ".jsonl"
              else pd.read_csv(path, dtype={"pair_id": str}))
    except (ValueError, OSError) as e:  # malformed JSON/CSV, empty file, a folder
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StudyError(f"{path}: cannot read the manifest ({first}); pass the manifest `revsd generate` wrote") from e
    missing = [c for c in ("pair_id", "prompt", *SIDES) if c not in df.columns]
    if missing:
        raise StudyError(f"{path}: missing column(s) {missing}")
    bad = [p for p in df["pair_id"] if not PAIR_ID.match(str(p))]
    if bad or df["pair_id"].duplicated().any():
        raise StudyError(f"{path}: pair ids must be unique and match {PAIR_ID.pattern} (bad: {bad[:3]})")
    return {str(r["pair_id"]): r for r in df.to_dict("records")}


# ---------------------------------------------------------------- storage

class StudyDB:
    """SQLite storage; a short-lived connection per use (safe across threads and processes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.connect() as con:
                con.execute("PRAGMA journal_mode=WAL")
                con.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise StudyError(f"{self.path}: not a usable study database ({e}); pass another --db") from e

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
        """(first side, second side) for this annotator and pair, drawn once at random and stored: the pair is
        then shown to this annotator (its page is being served), and only then can they vote on it."""
        con.execute("INSERT OR IGNORE INTO orders VALUES (?, ?, ?)",
                    (annotator, pair_id, random.SystemRandom().choice(SIDES)))
        return self.shown(con, annotator, pair_id)

    def shown(self, con: sqlite3.Connection, annotator: str, pair_id: str) -> tuple[str, str] | None:
        """The stored order if this pair was shown to this annotator, else None (nothing is drawn)."""
        row = con.execute("SELECT first FROM orders WHERE annotator=? AND pair_id=?", (annotator, pair_id)).fetchone()
        return None if row is None else (row[0], SIDES[1 - SIDES.index(row[0])])

    def vote(self, annotator: str, pair_id: str, choice: str) -> str:
        """Store (or replace) a vote in one transaction; returns the answer (ours / original / undecided).
        Raises :class:`NotShown` unless the pair was shown to this annotator (its order drawn)."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}")
        with self.connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                order = self.shown(con, annotator, pair_id)
                if order is None:
                    raise NotShown(f"pair {pair_id!r} was never shown to {annotator!r}: vote refused")
                first, second = order
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
        return read_votes(self.path)


# ---------------------------------------------------------------- tally (paper Table 3)

def read_votes(db_path: str | Path) -> pd.DataFrame:
    """The votes of an existing study database, never creating or changing one; StudyError if it is not one."""
    db_path = Path(db_path)
    hint = "pass the --db that `revsd study serve` used"
    if not db_path.is_file():
        raise StudyError(f"study database {db_path} not found: {hint}")
    with open(db_path, "rb") as f:
        if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise StudyError(f"{db_path} is not an SQLite database: {hint}")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db_path.resolve()}?mode=ro", uri=True, timeout=30)) as con:
            if con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='votes'").fetchone() is None:
                raise StudyError(f"{db_path} holds no study votes (no 'votes' table): {hint}")
            return pd.read_sql_query("SELECT annotator, pair_id, choice, answer, voted_at FROM votes "
                                     "ORDER BY annotator, pair_id", con)
    except sqlite3.Error as e:
        raise StudyError(f"{db_path}: cannot read the votes ({e}): {hint}") from e


def write_tally(db_path: str | Path, out_dir: str | Path | None = None) -> pd.DataFrame:
    db_path = Path(db_path)
    table = tally(read_votes(db_path))
    out = Path(out_dir or db_path.parent)
    write_text(out / "tally.md", "# Human study (paper Table 3)\n\n" + to_markdown(table))
    save_csv(out / "tally.csv", table, index=True)
    return table


# ---------------------------------------------------------------- web app

def image_path(root: Path, rel) -> Path | str:
    """The image file ``rel`` under ``root``, or a string saying why it cannot be served."""
    path = (root / str(rel)).resolve()
    if not path.is_relative_to(root):
        return f"{rel} is outside {root}"
    if path.suffix.lower() not in MIME:
        return f"{rel}: not {'/'.join(MIME)}"
    if not path.is_file():
        return f"{rel} not found"
    return path


def servable_pairs(pairs: dict[str, dict], root: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """``(kept, excluded)``: pairs whose two images can be served, and the others with the reason."""
    reasons = {pid: [p for p in (image_path(root, row[s]) for s in SIDES) if isinstance(p, str)]
               for pid, row in pairs.items()}
    excluded = {pid: why[0] for pid, why in reasons.items() if why}
    kept = {pid: row for pid, row in pairs.items() if pid not in excluded}
    if excluded:
        print(f"study: warning: {len(excluded)} pair(s) left out, their images cannot be served: "
              + "; ".join(f"{p} ({why})" for p, why in list(excluded.items())[:5]), file=sys.stderr)
    return kept, excluded


def create_app(manifest: str | Path | dict, db_path: str | Path, image_root: str | Path | None = None,
               annotators: list[str] | None = None, question: str = QUESTION):
    """The study app. ``manifest``: path or ``{pair_id: row}``; ``image_root``: folder the manifest's image
    paths are relative to (default: the manifest's folder); ``annotators``: allowed names/tokens (any if None).
    Pairs whose two images cannot be served are left out (a warning names them); none left raises StudyError."""
    from flask import Flask, abort, redirect, render_template, request, send_file, session, url_for

    if isinstance(manifest, dict):
        pairs = manifest
        if image_root is None:
            raise ValueError("image_root is required when the manifest is given as a dict")
    else:
        pairs = load_manifest(manifest)
        image_root = image_root or Path(manifest).parent
    root = Path(image_root).resolve()
    pairs, excluded = servable_pairs(pairs, root)
    if not pairs:
        raise StudyError(f"no pair of the manifest has two servable images under {root}: check the image paths")
    order_ids = list(pairs)
    allowed = set(annotators) if annotators else None
    db = StudyDB(db_path)

    app = Flask(__name__, template_folder=str(ASSETS / "templates"), static_folder=str(ASSETS / "static"))
    app.config.update(SECRET_KEY=db.secret(), SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_HTTPONLY=True)

    def csrf_token() -> str:  # one per session, in every form (templates call csrf_token())
        return session.setdefault("csrf", secrets.token_urlsafe(32))

    app.jinja_env.globals["csrf_token"] = csrf_token

    @app.before_request
    def check_csrf():
        if request.method == "POST":
            sent, want = request.form.get("csrf", ""), session.get("csrf", "")
            if not want or not secrets.compare_digest(sent.encode(), want.encode()):
                abort(400)

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
        return render_template("done.html", name=name, n=len(order_ids), first=order_ids[0])

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
        try:
            db.vote(name, pair_id, choice)
        except NotShown:
            abort(409)  # only pairs whose page this annotator was shown can be voted on
        return redirect(url_for("index"))

    @app.get("/image/<pair_id>/<int:position>")
    def image(pair_id: str, position: int):
        name, row = annotator(), pair_or_404(pair_id)
        if position not in (1, 2):
            abort(404)
        with db.connect() as con:
            order = db.shown(con, name, pair_id)
        if order is None:
            abort(404)  # images only for a pair whose page was shown (its order drawn)
        path = image_path(root, row[order[position - 1]])
        if isinstance(path, str):
            abort(404)  # never serve outside the image root, even from a tampered manifest
        return send_file(io.BytesIO(path.read_bytes()), mimetype=MIME[path.suffix.lower()], etag=False)

    app.extensions["revsd_study_db"] = db
    app.extensions["revsd_study_pairs"] = order_ids
    app.extensions["revsd_study_excluded"] = excluded
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
    try:
        if a.cmd == "tally":
            table = write_tally(a.db, a.out)
            print(to_markdown(table), end="")
            print(f"wrote tally.md, tally.csv in {Path(a.out or Path(a.db).parent)}")
            return 0
        db = a.db or Path(a.pairs).parent / "study.sqlite"
        names = [n.strip() for n in a.annotators.split(",") if n.strip()] if a.annotators else None
        app = create_app(a.pairs, db, annotators=names, question=a.question)
    except (StudyError, FileNotFoundError) as e:
        print(f"revsd study {a.cmd}: {e}", file=sys.stderr)
        return 2
    n = len(app.extensions["revsd_study_pairs"])
    print(f"study: {n} pairs, votes in {db}; open http://{a.host}:{a.port}/")
    app.run(host=a.host, port=a.port, threaded=True)
    return 0
