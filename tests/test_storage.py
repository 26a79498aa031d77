"""The schema and queries on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from optagent.errors import UserError
from optagent.job import JobConfig
from optagent.search import create_job
from optagent.storage import Trial, engine_for, find_job, get_trial, init_db, job_trials, normalize_url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")


def test_jobs_and_trials_round_trip(db_url: str) -> None:
    engine = init_db(db_url)
    cfg = JobConfig(model_path="/m/model.py", strategies=["pruning"], n_trials=3)
    import uuid

    name = f"store-{uuid.uuid4().hex[:8]}"
    job = create_job(engine, cfg, name, "ab" * 32)
    assert job.study_name.startswith(f"optagent-{job.id}-")
    with Session(engine) as s:
        s.add(Trial(job_id=job.id, number=0, state="complete", params={}, metrics={"accuracy": 0.97},
                    samples={"latency_ms": [1.0, 1.1]}, values=[0.97, 1.05], feasible=True, on_front=True,
                    hardware={"threads": 2}, worker={"host": "h"}))
        s.add(Trial(job_id=job.id, number=1, state="failed", failure_reason="boom"))
        s.commit()
    with Session(engine) as s:
        assert find_job(s, name).id == job.id
        assert find_job(s, str(job.id)).name == name
        rows = job_trials(s, job.id)
        assert [r.number for r in rows] == [0, 1]
        assert rows[0].metrics == {"accuracy": 0.97} and rows[0].samples["latency_ms"] == [1.0, 1.1]
        assert rows[0].values == [0.97, 1.05] and rows[1].failure_reason == "boom"
        assert get_trial(s, job.id, 1).state == "failed"
        assert JobConfig.from_json(find_job(s, name).config) == cfg
    with pytest.raises(UserError, match="already exists"):
        create_job(engine, cfg, name, "cd" * 32)


def test_trial_numbers_are_unique_per_job(db_url: str) -> None:
    import uuid

    engine = init_db(db_url)
    job = create_job(engine, JobConfig(model_path="/m.py"), f"u-{uuid.uuid4().hex[:8]}", "0" * 64)
    with Session(engine) as s:
        s.add(Trial(job_id=job.id, number=5))
        s.commit()
    with Session(engine) as s, pytest.raises(sa.exc.IntegrityError):
        s.add(Trial(job_id=job.id, number=5))
        s.commit()


def test_urls_people_paste_are_normalised() -> None:
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("x.db") == "sqlite:///x.db"
    with pytest.raises(UserError, match="not a URL"):
        normalize_url("nodb")


def test_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="cannot open database .*check --db"):
        init_db("postgresql+psycopg://nobody:secret@127.0.0.1:1/none")
    engine_for("postgresql+psycopg://nobody:secret@127.0.0.1:1/none").dispose()


def test_password_is_not_in_the_error() -> None:
    with pytest.raises(UserError) as info:
        init_db("postgresql+psycopg://nobody:hunter2@127.0.0.1:1/none")
    assert "hunter2" not in str(info.value)


def test_a_database_from_an_older_version_is_upgraded_in_place(tmp_path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    con = sqlite3.connect(path)  # the jobs table as an earlier optagent made it: no `key` column
    con.execute("CREATE TABLE optagent_jobs (id INTEGER PRIMARY KEY, name VARCHAR(200) NOT NULL UNIQUE, "
                "study_name VARCHAR(250) NOT NULL, model_path VARCHAR NOT NULL, model_hash VARCHAR(64) NOT NULL, "
                "config JSON NOT NULL, status VARCHAR(20) NOT NULL, error VARCHAR, created_at DATETIME NOT NULL, "
                "started_at DATETIME, finished_at DATETIME, heartbeat_at DATETIME)")
    con.execute("INSERT INTO optagent_jobs VALUES (1, 'old', 's', '/m.py', 'h', '{}', 'completed', NULL, "
                "'2026-01-01 00:00:00', NULL, NULL, NULL)")
    con.commit()
    con.close()
    engine = init_db(f"sqlite:///{path}")
    with Session(engine) as s:
        job = find_job(s, "old")
        assert job.status == "completed" and job.key is None
