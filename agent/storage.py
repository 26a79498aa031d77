"""optagent's tables (SQLModel) and the few queries the CLI and the coordinator need.

One database URL holds these tables and the Optuna study. Only portable column types are used (JSON,
text, numbers, timestamps), so the same schema runs on SQLite and PostgreSQL. The coordinator is the
only writer; read commands may run while a search writes (SQLite in WAL mode).
"""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlmodel import JSON, Column, Field, Session, SQLModel, select

from optagent.errors import UserError

DEFAULT_DB = "sqlite:///optagent.db"


class _State(sa.types.TypeDecorator[str]):
    """A short text column for a state; JobStatus/TrialState members are stored as their value."""

    impl = sa.String(20)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else str(getattr(value, "value", value))


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Job(SQLModel, table=True):
    __tablename__ = "optagent_jobs"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=200)
    # globally unique: names Celery tasks, so jobs of different databases sharing one Redis never collide
    key: str = Field(default_factory=lambda: uuid.uuid4().hex[:16], max_length=32)
    study_name: str = Field(max_length=250)
    model_path: str
    model_hash: str = Field(max_length=64)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="pending", sa_column=Column(_State, nullable=False))  # optagent.job.JobStatus
    error: str | None = None
    created_at: dt.datetime = Field(default_factory=utcnow)
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    heartbeat_at: dt.datetime | None = None  # the coordinator's last sign of life (resume tells if it died)


class Trial(SQLModel, table=True):
    __tablename__ = "optagent_trials"
    __table_args__ = (sa.UniqueConstraint("job_id", "number"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="optagent_jobs.id", index=True)
    number: int  # the Optuna trial number; 0 is the baseline
    state: str = Field(default="queued", sa_column=Column(_State, nullable=False))  # optagent.job.TrialState
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    recipe: str = ""  # human summary of the strategies that are on, e.g. "pruning(structured 0.5) + ..."
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    samples: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    values: list[float] | None = Field(default=None, sa_column=Column(JSON))  # objective values, job order
    feasible: bool | None = None
    on_front: bool = False
    failure_reason: str | None = None
    notes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    duration_s: float | None = None
    hardware: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    worker: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: dt.datetime = Field(default_factory=utcnow)
    finished_at: dt.datetime | None = None


class Analysis(SQLModel, table=True):
    """A strategy's one-off analysis of a model (`Strategy.analysis`), kept so later jobs on the same model
    file (same hash) reuse it instead of measuring it again."""

    __tablename__ = "optagent_analyses"
    __table_args__ = (sa.UniqueConstraint("model_hash", "strategy", "key"),)

    id: int | None = Field(default=None, primary_key=True)
    model_hash: str = Field(max_length=64, index=True)
    strategy: str = Field(max_length=200)
    key: str = Field(max_length=200)  # analysis version and the job settings it depends on
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: dt.datetime = Field(default_factory=utcnow)


def normalize_url(url: str | None) -> str:
    """Accept the URLs people paste: postgres://, postgresql:// -> psycopg 3; bare paths -> SQLite."""
    from optagent.security import redact_url

    url = (url or os.environ.get("OPTAGENT_DB") or DEFAULT_DB).strip()
    if "://" not in url:
        if url.endswith((".db", ".sqlite", ".sqlite3")) and ":" not in url:
            return f"sqlite:///{url}"
        raise UserError(f"database {redact_url(url)!r} is not a URL; use e.g. sqlite:///optagent.db or "
                        "postgresql+psycopg://user@host/db")
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


_engines: dict[str, Engine] = {}


def sqlite_creator(url: str) -> Any:
    """Connections for optagent's and Optuna's engines on one SQLite file: WAL (readers never block the
    coordinator), synchronous=NORMAL (in WAL mode an application crash loses nothing and the file is never
    corrupted; only a power cut may drop the last commits, which `optagent resume` re-runs) and a busy
    timeout for the read commands."""
    import sqlite3

    database = make_url(url).database or ":memory:"

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(database, timeout=30, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn
    return connect


def engine_for(url: str | None) -> Engine:
    """A cached engine per URL with bounded pools; SQLite gets WAL and a busy timeout."""
    from optagent.security import redact_text, redact_url

    url = normalize_url(url)
    if url in _engines:
        return _engines[url]
    fix = "use sqlite:///optagent.db or postgresql+psycopg://user@host/db (--db or OPTAGENT_DB)"
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise UserError(f"database URL {redact_url(url)} is malformed ({redact_text(str(exc))}); {fix}") from None
    try:
        if parsed.get_backend_name() == "sqlite":
            engine = sa.create_engine(url, creator=sqlite_creator(url))
        else:
            engine = sa.create_engine(url, pool_size=4, max_overflow=4, pool_pre_ping=True, pool_recycle=1800)
    except sa.exc.NoSuchModuleError:
        raise UserError(f"database URL {redact_url(url)} has an unknown scheme {parsed.drivername!r}; {fix}") from None
    except ModuleNotFoundError as exc:
        raise UserError(f"the database driver {exc.name!r} for {parsed.drivername} is not installed; pip install "
                        "'optagent[postgres]' for postgresql+psycopg, or use sqlite:///optagent.db") from None
    except (sa.exc.ArgumentError, TypeError, ValueError) as exc:
        raise UserError(f"database URL {redact_url(url)} is not usable ({redact_text(str(exc))}); {fix}") from None
    _engines[url] = engine
    return engine


def init_db(url: str | None) -> Engine:
    """Create optagent's tables if needed; a clear error if the server cannot be reached."""
    engine = engine_for(url)
    try:
        for attempt in range(3):
            try:
                SQLModel.metadata.create_all(engine)
                _add_missing_columns(engine)
                break
            except (sa.exc.OperationalError, sa.exc.ProgrammingError, sa.exc.IntegrityError) as exc:
                # another process (a search, a read command) created the same tables a moment ago
                if attempt == 2 or "already exists" not in str(exc.orig or exc):
                    raise
                time.sleep(0.2)
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        from optagent.security import redact_text

        reason = redact_text(str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc))
        shown = engine.url.render_as_string(hide_password=True)
        raise UserError(f"cannot open database {shown}: {reason}; check --db / OPTAGENT_DB and that the server "
                        "is running") from None
    except ModuleNotFoundError as exc:
        raise UserError(f"the database driver {exc.name!r} is not installed; pip install 'optagent[postgres]'") \
            from None
    return engine


def _add_missing_columns(engine: Engine) -> None:
    """Bring a database made by an older optagent up to date: new columns are added (nullable), nothing
    is dropped or rewritten, so stored jobs and trials survive an upgrade."""
    inspector = sa.inspect(engine)
    for table in (Job.__table__, Trial.__table__):  # type: ignore[attr-defined]
        present = {c["name"] for c in inspector.get_columns(table.name)}
        missing = [c for c in table.columns if c.name not in present]
        if not missing:
            continue
        with engine.begin() as conn:
            for column in missing:
                kind = column.type.compile(dialect=engine.dialect)
                conn.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def find_job(session: Session, ident: str) -> Job:
    """A job by id or by name (an id first: names are never purely numeric), or a UserError naming how to
    list them, with a "did you mean" for a near-miss name."""
    from optagent.job import did_you_mean

    ident = str(ident).strip()
    job = session.get(Job, int(ident)) if ident.isdigit() and len(ident) < 18 else None
    if job is None:
        job = session.exec(select(Job).where(Job.name == ident)).first()
    if job is None:
        names = list(session.exec(select(Job.name)))
        hint = did_you_mean(ident, names) if names and len(ident) <= 200 else ""
        raise UserError(f"no job {ident!r} in this database{hint}; run `optagent jobs` to list them (or pass --db)")
    return job


def job_trials(session: Session, job_id: int) -> list[Trial]:
    return list(session.exec(select(Trial).where(Trial.job_id == job_id).order_by(Trial.number)))  # type: ignore[arg-type]


def get_trial(session: Session, job_id: int, number: int) -> Trial | None:
    return session.exec(select(Trial).where(Trial.job_id == job_id, Trial.number == number)).first()
