"""Ctrl-C that lands inside a database call is raised once the call has returned, so the store stays usable."""
import os
import signal
import time

import pytest
import sqlalchemy
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from lab import interrupts
from lab.errors import Interrupted


@pytest.fixture
def handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    interrupts.install()
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture
def signal_in_sql():
    """Sends `count` SIGINTs from inside SQLAlchemy, just before the next SQL statement runs."""
    pending = []

    def send(*_):
        while pending:
            pending.pop()
            os.kill(os.getpid(), signal.SIGINT)

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", send)
    yield lambda count=1: pending.extend([1] * count)
    sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", send)


def test_a_signal_outside_a_store_call_is_raised_at_once(handlers):
    with pytest.raises(Interrupted, match="SIGTERM"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)


def test_a_signal_inside_an_mlflow_write_waits_for_it_and_the_run_can_still_be_ended(handlers, signal_in_sql, tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("lab", artifact_location=str(tmp_path))).info.run_id
    signal_in_sql()
    returned = False
    with pytest.raises(Interrupted, match="SIGINT"):
        client.log_batch(run_id, metrics=[Metric("val/acc", 0.5, 0, step) for step in range(50)])
        returned = True
        time.sleep(5)  # the held signal is raised here, within RECHECK_S
    assert returned
    started = time.monotonic()
    client.set_terminated(run_id, "KILLED")  # before the fix: "database is locked" after MLflow's 20 s busy wait
    assert time.monotonic() - started < 5
    assert client.get_run(run_id).info.status == "KILLED"
    assert len(client.get_metric_history(run_id, "val/acc")) == 50  # the interrupted write is whole


def test_a_second_signal_while_one_is_held_is_raised_where_it_lands(handlers, signal_in_sql):
    engine = sqlalchemy.create_engine("sqlite://")
    signal_in_sql(count=2)
    with pytest.raises(Interrupted), engine.connect() as connection:
        connection.execute(sqlalchemy.text("select 1"))
        pytest.fail("the second Ctrl-C should have stopped the statement")
