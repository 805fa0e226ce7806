"""Feedback on saved predictions and accuracy by model version, against real PostgreSQL and
moto's S3 server (tests/servers_storage.py). Without them these tests fail when CI=true and are
skipped otherwise.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from tests.helpers import auth, class_map
from tests.servers_mlflow import metric_value
from tests.servers_storage import (
    PREDICTIONS,
    MotoS3Server,
    PostgresServer,
    bucket_fixture,  # noqa: F401  (registers the `bucket` fixture)
    database_fixture,  # noqa: F401  (registers the `database` fixture)
    history,
    moto_s3_fixture,  # noqa: F401  (registers the module-scoped `moto_s3` fixture)
    poll,
    postgres_fixture,  # noqa: F401  (registers the module-scoped `postgres` fixture)
    save,
    storage_overrides,
)

MODEL = "/api/v1/inference/model"
CLASSES = list(class_map().values())


def saved(client: TestClient, user: uuid.UUID, seed: int) -> dict[str, Any]:
    """Save a prediction and wait until it is stored (out of the outbox)."""
    response = save(client, user, seed=seed)
    assert response.status_code == 200, response.text
    uid = response.json()["prediction_uid"]

    def stored() -> dict[str, Any] | None:
        found = client.get(f"{PREDICTIONS}/{uid}", headers=auth(user))
        return found.json() if found.status_code == 200 and found.json()[
            "status"] == "stored" else None

    return poll(stored, message="the save never reached the database")


def feedback(client: TestClient, user: uuid.UUID, uid: str, value: object) -> Any:
    return client.put(
        f"{PREDICTIONS}/{uid}/feedback", json={"correct_class": value}, headers=auth(user)
    )


def other_class(name: str) -> str:
    return next(candidate for candidate in CLASSES if candidate != name)


def feedback_rows(postgres: PostgresServer, database: str) -> list[str]:
    out = postgres.psql(
        "SELECT prediction_uid, correct_class_name, agreed FROM prediction_feedback "
        "ORDER BY prediction_uid", database,
    )
    return [line for line in out.splitlines() if line]


def test_feedback_scoping_validation_history_idempotence_and_deletion(
    make_client: Callable[..., TestClient], postgres: PostgresServer, database: str,
    moto_s3: MotoS3Server, bucket: str,
) -> None:
    client = make_client(**storage_overrides(postgres, database, moto_s3, bucket))
    alice, bob = uuid.uuid4(), uuid.uuid4()
    first = saved(client, alice, seed=1)
    uid, predicted = first["uid"], first["predicted_class_name"]
    assert "feedback" not in first

    # Another user (or no such prediction): 404, and nothing is stored.
    assert feedback(client, bob, uid, predicted).status_code == 404
    assert client.delete(f"{PREDICTIONS}/{uid}/feedback", headers=auth(bob)).status_code == 404
    assert feedback(client, alice, str(uuid.uuid4()), predicted).status_code == 404
    assert client.put(f"{PREDICTIONS}/{uid}/feedback", json={"correct_class": predicted}
                      ).status_code == 401
    # Unknown classes: 422 naming the valid ones; malformed bodies: 422 too, never 500.
    for bad in ("Banana__Purple", 28, -1, "", None):
        response = feedback(client, alice, uid, bad)
        assert response.status_code == 422, (bad, response.text)
    detail = feedback(client, alice, uid, "Banana__Purple").json()["detail"]
    assert "Banana__Purple" in detail and CLASSES[0] in detail and CLASSES[-1] in detail
    extra = client.put(f"{PREDICTIONS}/{uid}/feedback",
                       json={"correct_class": predicted, "x": 1}, headers=auth(alice))
    assert extra.status_code == 422
    assert feedback_rows(postgres, database) == []

    # By name: agrees with the prediction. Again: the same answer (idempotent), one row.
    response = feedback(client, alice, uid, predicted)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["correct_class_name"] == predicted and body["agreed"] is True
    assert body["correct_class"] == CLASSES.index(predicted)
    assert body["model_version"] == first["model_version"]
    again = feedback(client, alice, uid, predicted)
    assert again.status_code == 200 and again.json() == body
    assert feedback_rows(postgres, database) == [f"{uid}|{predicted}|t"]

    # By index (a number or its digits): replaces it; disagrees now. The history shows it.
    wrong = other_class(predicted)
    changed = feedback(client, alice, uid, CLASSES.index(wrong))
    assert changed.status_code == 200 and changed.json()["agreed"] is False
    assert feedback(client, alice, uid, str(CLASSES.index(wrong))).json() == changed.json()
    assert feedback_rows(postgres, database) == [f"{uid}|{wrong}|f"]
    listed = {item["uid"]: item for item in history(client, alice)}
    assert listed[uid]["feedback"]["correct_class_name"] == wrong
    assert listed[uid]["feedback"]["agreed"] is False
    one = client.get(f"{PREDICTIONS}/{uid}", headers=auth(alice)).json()
    assert one["feedback"] == listed[uid]["feedback"]
    assert history(client, bob) == []

    # Retract: gone from the history; retracting again is fine (idempotent).
    for _ in range(2):
        assert client.delete(f"{PREDICTIONS}/{uid}/feedback",
                             headers=auth(alice)).status_code == 204
    assert feedback_rows(postgres, database) == []
    assert "feedback" not in history(client, alice)[0]

    # Deleting a prediction deletes its feedback.
    assert feedback(client, alice, uid, wrong).status_code == 200
    assert client.delete(f"{PREDICTIONS}/{uid}", headers=auth(alice)).status_code == 204
    assert feedback_rows(postgres, database) == []
    assert feedback(client, alice, uid, wrong).status_code == 404

    # A save still in the outbox (S3 paused): 409 with Retry-After, then fine once stored.
    moto_s3.pause()
    try:
        response = save(client, alice, seed=2)
        assert response.status_code == 200, response.text
        pending_uid = response.json()["prediction_uid"]
        refused = feedback(client, alice, pending_uid, wrong)
        assert refused.status_code == 409 and refused.headers["Retry-After"]
        # Someone else's pending save is still a 404.
        assert feedback(client, bob, pending_uid, wrong).status_code == 404
    finally:
        moto_s3.resume()
    poll(lambda: client.get(f"{PREDICTIONS}/{pending_uid}", headers=auth(alice)).json().get(
        "status") == "stored", message="the pending save never drained")
    assert feedback(client, alice, pending_uid, wrong).status_code == 200


def test_metrics_and_model_info_after_a_scripted_feedback_session(
    make_client: Callable[..., TestClient], postgres: PostgresServer, database: str,
    moto_s3: MotoS3Server, bucket: str,
) -> None:
    client = make_client(**storage_overrides(postgres, database, moto_s3, bucket))
    user = uuid.uuid4()
    info = client.get(MODEL, headers=auth(user)).json()
    version = info["version"]
    assert info["feedback"] == {"count": 0, "agreed": 0, "accuracy": None}
    # Before any feedback the serving version's series exist (at 0), the accuracy does not.

    def scrape(name: str, **labels: str) -> float | None:
        text = client.get("/metrics").text
        return metric_value(text, name, model_version=version, **labels)

    before_true = scrape("inference_feedback_total", agreed="true")
    before_false = scrape("inference_feedback_total", agreed="false")
    assert before_true is not None and before_false is not None
    assert scrape("inference_feedback_window", agreed="true") == 0
    assert scrape("inference_feedback_accuracy") is None
    items = [saved(client, user, seed) for seed in range(4)]
    # 3 right, 1 wrong; the wrong one is first marked right, then corrected (a change counts).
    for item in items[:3]:
        assert feedback(client, user, item["uid"], item["predicted_class_name"]).status_code == 200
    last = items[3]
    assert feedback(client, user, last["uid"], last["predicted_class_name"]).status_code == 200
    assert feedback(client, user, last["uid"], last["predicted_class_name"]).status_code == 200
    assert feedback(client, user, last["uid"],
                    other_class(last["predicted_class_name"])).status_code == 200

    assert scrape("inference_feedback_total", agreed="true") == before_true + 4
    assert scrape("inference_feedback_total", agreed="false") == before_false + 1
    assert scrape("inference_feedback_accuracy") == 0.75
    assert scrape("inference_feedback_window", agreed="true") == 3
    assert scrape("inference_feedback_window", agreed="false") == 1
    model = client.get(MODEL, headers=auth(user)).json()["feedback"]
    assert model == {"count": 4, "agreed": 3, "accuracy": 0.75}

    # Retracting one, deleting another: both leave the window and the database's count.
    assert client.delete(f"{PREDICTIONS}/{items[0]['uid']}/feedback",
                         headers=auth(user)).status_code == 204
    assert client.delete(f"{PREDICTIONS}/{last['uid']}", headers=auth(user)).status_code == 204
    assert scrape("inference_feedback_accuracy") == 1.0
    assert scrape("inference_feedback_window", agreed="true") == 2
    assert scrape("inference_feedback_window", agreed="false") == 0
    model = client.get(MODEL, headers=auth(user)).json()["feedback"]
    assert model == {"count": 2, "agreed": 2, "accuracy": 1.0}


def test_feedback_on_the_embedded_sqlite_store(make_client: Callable[..., TestClient]) -> None:
    """The default deployment (SQLite + local folder): same behaviour, no foreign-key cascade
    needed (the repository deletes feedback with its prediction itself)."""
    client = make_client()
    user = uuid.uuid4()
    item = saved(client, user, seed=3)
    wrong = other_class(item["predicted_class_name"])
    response = feedback(client, user, item["uid"], wrong)
    assert response.status_code == 200, response.text
    assert history(client, user)[0]["feedback"]["correct_class_name"] == wrong
    model = client.get(MODEL, headers=auth(user)).json()["feedback"]
    assert model == {"count": 1, "agreed": 0, "accuracy": 0.0}
    assert client.delete(f"{PREDICTIONS}/{item['uid']}", headers=auth(user)).status_code == 204
    assert client.get(MODEL, headers=auth(user)).json()["feedback"]["count"] == 0
