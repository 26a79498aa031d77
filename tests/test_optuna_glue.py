"""optagent.search.study against the installed Optuna: every use of its private API behaves as relied on.

If an Optuna upgrade changes one of these, this file fails before a search does.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa

from optagent.job import JobConfig
from optagent.search import study as glue


def _study(tmp_path: Path) -> optuna.Study:
    url = f"sqlite:///{tmp_path / 'glue.db'}"
    return glue.open_study(url, "glue", JobConfig(model_path="m.py"), {"optagent_job": "glue"})


def test_staged_writes_go_in_with_the_tell(tmp_path: Path) -> None:
    study = _study(tmp_path)
    storage = glue.study_storage(study)
    engine = storage.engine
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE rows (n INTEGER PRIMARY KEY, v TEXT)"))
        conn.execute(sa.text("INSERT INTO rows VALUES (1, 'sent')"))
    trial = study.ask()
    statement = sa.text("UPDATE rows SET v = 'told' WHERE n = 1")
    written = glue.stage_and_tell(study, trial, [0.9, 1.0], statements=(statement,),
                                  system={glue.CONSTRAINT_ATTR: -0.5}, user={"optagent": {"optagent_number": 1}})
    assert written
    frozen = study.trials[0]
    assert frozen.state == optuna.trial.TrialState.COMPLETE and frozen.values == [0.9, 1.0]
    assert frozen.user_attrs["optagent"] == {"optagent_number": 1}
    assert frozen.constraints == {glue.CONSTRAINT: -0.5}  # what the samplers read (Trial.set_constraint writes it)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT v FROM rows WHERE n = 1")).scalar() == "told"


def test_a_second_tell_is_skipped_and_says_so(tmp_path: Path) -> None:
    study = _study(tmp_path)
    trial = study.ask()
    assert glue.stage_and_tell(study, trial, [0.5, 2.0])
    assert not glue.stage_and_tell(study, trial, [0.1, 9.0], user={"optagent": {"late": True}})
    assert study.trials[0].values == [0.5, 2.0] and "optagent" not in study.trials[0].user_attrs


def test_a_failed_staged_statement_writes_nothing(tmp_path: Path) -> None:
    study = _study(tmp_path)
    trial = study.ask()
    missing_row = sa.text("UPDATE optagent_nothing SET x = 1")
    with pytest.raises(sa.exc.OperationalError):
        glue.stage_and_tell(study, trial, [0.5, 2.0], statements=(missing_row,))
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING


def test_trial_handle_finds_a_running_trial_by_number(tmp_path: Path) -> None:
    study = _study(tmp_path)
    first, second = study.ask(), study.ask()
    handle = glue.trial_handle(study, second.number)
    assert glue.trial_id(handle) == glue.trial_id(second) != glue.trial_id(first)
    glue.tell(study, handle.number, None)
    assert study.trials[1].state == optuna.trial.TrialState.FAIL


def test_the_baseline_is_added_with_its_constraint(tmp_path: Path) -> None:
    study = _study(tmp_path)
    dist = optuna.distributions.CategoricalDistribution(("none", "structured"))
    glue.add_known_trial(study, {"pruning.method": "none"}, {"pruning.method": dist}, [0.9, 10.0],
                         {"optagent_number": 0})
    t = study.trials[0]
    assert t.state == optuna.trial.TrialState.COMPLETE and t.constraints == {glue.CONSTRAINT: 0.0}
    assert t.user_attrs["optagent_number"] == 0
