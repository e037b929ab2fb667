"""Who may see what: permission sets on REST and on the stream, freezing, deletion, revocation.

Each test makes its own identities (registered on the shared server) and packs,
so what it asserts about one identity's view cannot be satisfied by another
test's data. Changes of access are made as an operator would, with SQL or the
attune-sse command, and must show within 2 s on every worker.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from attune_sse.serve.cli import main
from helpers import (
    Api,
    RawStream,
    Stream,
    every_worker,
    grant,
    make_pack,
    new_execution,
    pack_grants,
    streams_on_every_worker,
    touch,
    wait_until,
)

REVOCATION_SECONDS = 2.0
PASSWORD = "correct horse battery"


def register(server: Any, prefix: str) -> dict[str, Any]:
    login = f"{prefix}-{uuid.uuid4().hex[:8]}"
    response = requests.post(server.base_url + "/auth/register",
                             json={"login": login, "password": PASSWORD}, timeout=10)
    assert response.status_code == 201, response.text
    data = response.json()["data"]
    return {**data, "login": login, "id": data["user"]["id"], "api": Api(server.base_url, data["access_token"])}


def streams_of(server: Any, token: str) -> list[Stream]:
    """Streams of one identity, at least one on every worker."""
    url = server.base_url + "/api/v1/executions/stream"
    return streams_on_every_worker(lambda: Stream(url, {"token": token}), server.workers)


def execution_ids(events: list[Any]) -> list[int]:
    return [e.json["entity_id"] for e in events]


@pytest.fixture
def teams(server: Any, database: Any) -> dict[str, Any]:
    """Alice may do everything with pack a-*, Bob with pack b-*, Root has the admin set."""
    tag = uuid.uuid4().hex[:6]
    alice, bob, root = register(server, "alice"), register(server, "bob"), register(server, "root")
    a_ref, b_ref = make_pack(database, f"a-{tag}"), make_pack(database, f"b-{tag}")
    grant(database, alice, f"team.a{tag}", pack_grants(f"a-{tag}"))
    grant(database, bob, f"team.b{tag}", pack_grants(f"b-{tag}"))
    grant(database, root, f"team.root{tag}", [{"resource": r, "actions": a} for r, a in
                                              (("executions", ["read", "create", "update"]),
                                               ("packs", ["read", "create"]), ("actions", ["read", "create"]))])
    return {"alice": alice, "bob": bob, "root": root, "a": a_ref, "b": b_ref, "tag": tag}


def test_each_identity_sees_only_its_packs_executions_on_rest(teams: dict[str, Any], database: Any) -> None:
    alice, bob, root = teams["alice"], teams["bob"], teams["root"]
    mine = alice["api"].post("/api/v1/executions", json={"action_ref": teams["a"], "config": {"secret": "a"}})
    assert mine.status_code == 201, mine.text
    theirs = bob["api"].post("/api/v1/executions", json={"action_ref": teams["b"], "config": {"secret": "b"}})
    assert theirs.status_code == 201, theirs.text
    a_id, b_id = mine.json()["data"]["id"], theirs.json()["data"]["id"]

    # Bob may not read Alice's execution: it does not exist for him, on every verb.
    for response in (bob["api"].get(f"/api/v1/executions/{a_id}"),
                     bob["api"].patch(f"/api/v1/executions/{a_id}", json={"status": "failed"})):
        assert response.status_code == 404, response.text
        assert response.json()["code"] == "EXECUTION_NOT_FOUND"
    ((status,),) = database.query("SELECT status::text FROM attune.execution WHERE id = %s", (a_id,))
    assert status == "requested", "the refused PATCH changed nothing"
    # ... nor run her action, nor see it, nor her pack.
    refused = bob["api"].post("/api/v1/executions", json={"action_ref": teams["a"]})
    assert refused.status_code == 422 and refused.json()["code"] == "ACTION_NOT_FOUND"
    assert teams["a"] not in [a["ref"] for a in bob["api"].get("/api/v1/actions").json()["data"]]
    assert f"a-{teams['tag']}" not in [p["ref"] for p in bob["api"].get("/api/v1/packs").json()["data"]]
    assert bob["api"].post("/api/v1/packs", json={"ref": f"c-{teams['tag']}"}).status_code == 403

    # Lists, and their totals, hold only what each may read.
    for who, own, other in ((alice, a_id, b_id), (bob, b_id, a_id)):
        body = who["api"].get("/api/v1/executions", params={"per_page": 500}).json()
        ids = [e["id"] for e in body["data"]]
        assert own in ids and other not in ids
        assert body["meta"]["total"] == len(ids)
    everything = root["api"].get("/api/v1/executions", params={"per_page": 500}).json()
    assert {a_id, b_id} <= {e["id"] for e in everything["data"]}
    assert root["api"].get(f"/api/v1/executions/{b_id}").status_code == 200


def test_read_only_grant_gets_403_on_changes(teams: dict[str, Any], database: Any, server: Any) -> None:
    viewer = register(server, "viewer")
    grant(database, viewer, f"view.a{teams['tag']}", pack_grants(f"a-{teams['tag']}", ("read",)))
    execution_id = new_execution(database, teams["a"])
    assert viewer["api"].get(f"/api/v1/executions/{execution_id}").status_code == 200
    patched = viewer["api"].patch(f"/api/v1/executions/{execution_id}", json={"status": "canceling"})
    assert patched.status_code == 403 and patched.json() == {
        "error": f"You may not change execution {execution_id}.", "code": "FORBIDDEN"}
    created = viewer["api"].post("/api/v1/executions", json={"action_ref": teams["a"]})
    assert created.status_code == 403 and created.json()["code"] == "FORBIDDEN"


def test_streams_carry_only_readable_executions_on_every_worker(teams: dict[str, Any], database: Any,
                                                                  server: Any) -> None:
    alice, bob, root = teams["alice"], teams["bob"], teams["root"]
    a_id, b_id = new_execution(database, teams["a"]), new_execution(database, teams["b"])
    streams = {name: streams_of(server, who["access_token"])
               for name, who in (("alice", alice), ("bob", bob), ("root", root))}
    alice_one = Stream(server.base_url + "/api/v1/executions/stream",
                       {"token": alice["access_token"], "execution_id": a_id})
    refused = requests.get(server.base_url + "/api/v1/executions/stream",
                           params={"token": alice["access_token"], "execution_id": b_id}, timeout=10)
    assert refused.status_code == 404 and refused.json()["code"] == "EXECUTION_NOT_FOUND"

    for _ in range(3):
        touch(database, b_id)
        touch(database, a_id)
    touch(database, a_id, "completed")
    touch(database, b_id, "completed")
    last = {"entity_id": b_id, "status": "completed"}
    done = lambda doc: doc["entity_id"] == last["entity_id"] and doc["data"]["status"] == "completed"  # noqa: E731
    for stream in streams["root"]:
        assert set(execution_ids(stream.events_until(done))) == {a_id, b_id}
    for stream in streams["bob"]:
        assert set(execution_ids(stream.events_until(done))) == {b_id}
    for stream in streams["alice"] + [alice_one]:
        seen = stream.events_until(lambda doc: doc["entity_id"] == a_id and doc["data"]["status"] == "completed")
        assert set(execution_ids(seen)) == {a_id}
    # Bob's completion came after Alice's: had it been sent to her, it would be next.
    touch(database, a_id, "failed")
    for stream in streams["alice"]:
        assert stream.next_event().json["entity_id"] == a_id


def test_resume_skips_what_the_identity_may_not_read(teams: dict[str, Any], database: Any,
                                                       server: Any) -> None:
    alice = teams["alice"]
    a_id, b_id = new_execution(database, teams["a"]), new_execution(database, teams["b"])
    ((start,),) = database.query("SELECT coalesce(max(id), 0) FROM attune.execution_event")
    for status in ("scheduled", "running", "completed"):
        touch(database, b_id, status)
        touch(database, a_id, status)
    stream = Stream(server.base_url + "/api/v1/executions/stream",
                    {"token": alice["access_token"], "last_event_id": start})
    events = stream.events_until(lambda doc: doc["entity_id"] == a_id and doc["data"]["status"] == "completed")
    assert execution_ids(events) == [a_id] * 3  # her three, none of Bob's, interleaved as they were


def test_freeze_cuts_rest_streams_and_refresh_within_2s_and_unfreeze_restores(
        teams: dict[str, Any], database: Any, server: Any) -> None:
    alice = teams["alice"]
    streams = streams_of(server, alice["access_token"])
    assert alice["api"].get("/api/v1/executions").status_code == 200
    frozen_at = time.monotonic()
    database.query("UPDATE attune.identity SET frozen = true WHERE id = %s", (alice["id"],))
    for stream in streams:
        event = stream.next_event(timeout=REVOCATION_SECONDS + 1)
        assert event.event == "signed_out", event
    streams_cut = time.monotonic() - frozen_at
    wait_until(lambda: alice["api"].get("/api/v1/executions").status_code == 401
               and alice["api"].get("/api/v1/executions").status_code == 401, REVOCATION_SECONDS, "REST refused")
    cut = time.monotonic() - frozen_at
    print(f"freeze: every stream signed out after {streams_cut * 1000:.0f} ms, REST refused after {cut * 1000:.0f} ms")
    assert cut < REVOCATION_SECONDS, cut
    refused = alice["api"].get("/api/v1/executions")
    assert refused.json()["code"] == "IDENTITY_FROZEN"
    refreshed = requests.post(server.base_url + "/auth/refresh", timeout=10,
                              headers={"Authorization": f"Bearer {alice['refresh_token']}"})
    assert refreshed.status_code == 401 and refreshed.json()["code"] == "IDENTITY_FROZEN"
    login = requests.post(server.base_url + "/auth/login", json={"login": alice["login"], "password": PASSWORD},
                          timeout=10)
    assert login.status_code == 401 and login.json()["code"] == "IDENTITY_FROZEN"
    stream = requests.get(server.base_url + "/api/v1/executions/stream",
                          params={"token": alice["access_token"]}, timeout=10)
    assert stream.status_code == 401

    database.query("UPDATE attune.identity SET frozen = false WHERE id = %s", (alice["id"],))

    def every_worker_lets_her_in() -> bool:
        workers = set()
        for _ in range(12):  # new connections: gunicorn hands them to either worker
            with requests.get(server.base_url + "/api/v1/executions/stream", params={"token": alice["access_token"]},
                              stream=True, timeout=5) as response:
                if response.status_code != 200:
                    return False
                workers.add(response.headers["X-Attune-Worker"])
        return len(workers) == server.workers

    wait_until(every_worker_lets_her_in, REVOCATION_SECONDS + 1, "every worker to let her in again")
    assert alice["api"].get("/api/v1/executions").status_code == 200


def test_deleted_identity_is_refused_everywhere_within_2s(teams: dict[str, Any], database: Any,
                                                           server: Any) -> None:
    bob = teams["bob"]
    streams = streams_of(server, bob["access_token"])
    b_id = new_execution(database, teams["b"])
    deleted_at = time.monotonic()
    database.query("DELETE FROM attune.identity WHERE id = %s", (bob["id"],))
    for stream in streams:
        # Events of his executions may still arrive before the cut; then the stream ends signed out.
        while stream.next_event(timeout=REVOCATION_SECONDS + 1).event != "signed_out":
            pass
    assert time.monotonic() - deleted_at < REVOCATION_SECONDS
    touch(database, b_id)
    for stream in streams:
        assert stream.ended(timeout=2.0)
    wait_until(lambda: all(bob["api"].get("/api/v1/executions").status_code == 401 for _ in range(4)),
               REVOCATION_SECONDS, "REST refused")
    print(f"delete: streams ended and REST refused within {(time.monotonic() - deleted_at) * 1000:.0f} ms")
    assert time.monotonic() - deleted_at < REVOCATION_SECONDS
    assert bob["api"].get("/auth/me").json()["code"] == "IDENTITY_DELETED"
    refreshed = requests.post(server.base_url + "/auth/refresh", timeout=10,
                              headers={"Authorization": f"Bearer {bob['refresh_token']}"})
    assert refreshed.status_code == 401 and refreshed.json()["code"] == "IDENTITY_DELETED"
    created = bob["api"].post("/api/v1/executions", json={"action_ref": teams["b"]})
    assert created.status_code == 401, "not a 500 (the executor would not exist)"


def test_narrowed_grants_narrow_open_streams(teams: dict[str, Any], database: Any, server: Any) -> None:
    tag = teams["tag"]
    carol = register(server, "carol")
    grant(database, carol, f"team.ca{tag}", pack_grants(f"a-{tag}"))
    grant(database, carol, f"team.cb{tag}", pack_grants(f"b-{tag}"))
    a_id, b_id = new_execution(database, teams["a"]), new_execution(database, teams["b"])
    streams = streams_of(server, carol["access_token"])
    touch(database, b_id, "scheduled")
    for stream in streams:
        assert stream.events_until(lambda doc: doc["entity_id"] == b_id)
    assert carol["api"].get(f"/api/v1/executions/{b_id}").status_code == 200

    database.query(
        """DELETE FROM attune.permission_assignment WHERE identity = %s
           AND permission_set = (SELECT id FROM attune.permission_set WHERE ref = %s)""",
        (carol["id"], f"team.cb{tag}"))
    wait_until(lambda: all(carol["api"].get(f"/api/v1/executions/{b_id}").status_code == 404 for _ in range(4)),
               REVOCATION_SECONDS, "REST applies the narrower grants")
    ((now,),) = database.query("SELECT generation FROM attune.access_generation")
    every_worker(server, lambda ready: (ready["access"]["applied"] or 0) >= now, "its streams got the narrower grants")
    touch(database, b_id, "running")
    touch(database, a_id, "running")
    for stream in streams:
        assert stream.next_event().json["entity_id"] == a_id, "b's event after the revocation was sent"


def test_cli_manages_permission_sets_and_identities(config_file: str, database: Any, server: Any,
                                                    teams: dict[str, Any]) -> None:
    run = lambda *args: CliRunner().invoke(main, [*args, "-c", config_file])  # noqa: E731
    tag, dave = teams["tag"], register(server, "dave")
    ref = f"cli.viewers{tag}"
    grants = json.dumps([{"resource": "executions", "actions": ["read"], "constraints": {"pack_refs": [f"a-{tag}"]}}])
    assert run("permset", "create", ref, "--grants", grants, "--label", "Viewers").exit_code == 0
    again = run("permset", "create", ref, "--grants", grants)
    assert again.exit_code == 1 and again.output.strip().splitlines() == [
        f"Error: permission set {ref!r} exists; pass --replace to change its grants"]
    bad = run("permset", "create", f"cli.bad{tag}", "--grants", '[{"resource": "users", "actions": ["read"]}]')
    assert bad.exit_code == 1 and "grant 1: 'resource' must be one of executions, packs, actions" in bad.output
    assert run("permset", "assign", "nobody-at-all", ref).output.strip() == "Error: no identity 'nobody-at-all'"
    assigned = run("permset", "assign", dave["login"], ref)
    assert assigned.exit_code == 0, assigned.output

    b_id, a_id = new_execution(database, teams["b"]), new_execution(database, teams["a"])
    wait_until(lambda: dave["api"].get(f"/api/v1/executions/{b_id}").status_code == 404, REVOCATION_SECONDS,
               "the assignment applies")
    assert dave["api"].get(f"/api/v1/executions/{a_id}").status_code == 200
    assert dave["api"].patch(f"/api/v1/executions/{a_id}", json={"status": "failed"}).status_code == 403

    assert run("permset", "revoke", dave["login"], ref).exit_code == 0
    again = run("permset", "revoke", dave["login"], ref)
    assert again.exit_code == 1 and "is not assigned" in again.output
    for command in ("freeze", "unfreeze", "delete"):
        missing = run("user", command, "nobody-at-all")
        assert missing.exit_code == 1 and missing.output.strip() == "Error: no identity 'nobody-at-all'"
    assert run("user", "freeze", dave["login"]).exit_code == 0
    wait_until(lambda: dave["api"].get("/api/v1/packs").status_code == 401, REVOCATION_SECONDS, "frozen")
    assert run("user", "unfreeze", dave["login"]).exit_code == 0
    wait_until(lambda: dave["api"].get("/api/v1/packs").status_code == 200, REVOCATION_SECONDS, "unfrozen")
    assert run("user", "delete", dave["login"]).exit_code == 0
    wait_until(lambda: dave["api"].get("/api/v1/packs").status_code == 401, REVOCATION_SECONDS, "deleted")

    admin = f"admin-{tag}"
    created = run("user", "create", admin, "--password", PASSWORD, "--admin")
    assert created.exit_code == 0 and "with core.admin" in created.output, created.output
    login = requests.post(server.base_url + "/auth/login", json={"login": admin, "password": PASSWORD}, timeout=10)
    admin_api = Api(server.base_url, login.json()["data"]["access_token"])
    assert admin_api.get(f"/api/v1/executions/{b_id}").status_code == 200
    assert admin_api.post("/api/v1/packs", json={"ref": f"adm-{tag}"}).status_code == 201


def test_default_grants_apply_only_without_an_assignment(teams: dict[str, Any], database: Any,
                                                          server: Any) -> None:
    """The shared server grants everything by default (as config.test.yaml); an empty set grants nothing."""
    erin = register(server, "erin")
    b_id = new_execution(database, teams["b"])
    assert erin["api"].get(f"/api/v1/executions/{b_id}").status_code == 200
    grant(database, erin, f"none.e{teams['tag']}", [])
    wait_until(lambda: all(erin["api"].get(f"/api/v1/executions/{b_id}").status_code == 404 for _ in range(4)),
               REVOCATION_SECONDS, "an assignment replaces the defaults")
    assert erin["api"].get("/api/v1/executions").json()["meta"]["total"] == 0


def test_a_quiet_constrained_stream_moves_past_what_it_was_not_sent(teams: dict[str, Any], database: Any,
                                                                      server: Any) -> None:
    """Its keep-alives carry the position, so a reconnect does not read others' events again."""
    alice = teams["alice"]
    b_id = new_execution(database, teams["b"])
    stream = RawStream(server.base_url, {"token": alice["access_token"]})
    for status in ("scheduled", "running", "completed"):
        touch(database, b_id, status)
    ((newest,),) = database.query("SELECT max(id) FROM attune.execution_event WHERE execution = %s", (b_id,))

    def moved_past() -> bool:
        stream.read_until_closed(0.2)
        return any(n >= newest for n in stream.event_ids()) and b'"entity_id"' not in stream.body()[0]

    wait_until(moved_past, 5, "a keep-alive with an id at or after Bob's last event")
    assert f'"entity_id": {b_id}'.encode() not in stream.body()[0]


def test_a_token_stays_dead_when_its_identity_id_is_given_again(teams: dict[str, Any], database: Any,
                                                                 server: Any) -> None:
    """A restore, a failover to a replica that was behind or a sequence reset gives a deleted identity's
    id to another: the deleted one's tokens and streams stay dead, the new one's work."""
    carol = register(server, "carol")
    grant(database, carol, f"team.c{teams['tag']}", pack_grants(teams["b"].split(".")[0]))
    streams = streams_of(server, carol["access_token"])
    dave = f"dave-{uuid.uuid4().hex[:8]}"
    # One transaction: the workers' access watcher sees one change, with the id already someone else's.
    database.query(
        """WITH gone AS (DELETE FROM attune.identity WHERE id = %s RETURNING id, password_hash)
           INSERT INTO attune.identity (id, login, display_name, password_hash)
           SELECT id, %s, 'Dave', password_hash FROM gone""", (carol["id"], dave))
    replaced_at = time.monotonic()
    for stream in streams:
        while stream.next_event(timeout=REVOCATION_SECONDS + 1).event != "signed_out":
            pass
    wait_until(lambda: all(carol["api"].get("/api/v1/executions").status_code == 401 for _ in range(4)),
               REVOCATION_SECONDS, "the old token refused on every worker")
    assert time.monotonic() - replaced_at < REVOCATION_SECONDS + 1
    assert carol["api"].get("/auth/me").json()["code"] == "IDENTITY_DELETED"
    refreshed = requests.post(server.base_url + "/auth/refresh", timeout=10,
                              headers={"Authorization": f"Bearer {carol['refresh_token']}"})
    assert refreshed.status_code == 401 and refreshed.json()["code"] == "IDENTITY_DELETED"
    refused = requests.get(server.base_url + "/api/v1/executions/stream", params={"token": carol["access_token"]},
                           timeout=10)
    assert refused.status_code == 401 and refused.json()["code"] == "IDENTITY_DELETED"
    # The identity that has the id now logs in and is itself.
    login = requests.post(server.base_url + "/auth/login", json={"login": dave, "password": PASSWORD}, timeout=10)
    assert login.status_code == 200, login.text
    me = Api(server.base_url, login.json()["data"]["access_token"]).get("/auth/me").json()["data"]
    assert me == {"id": carol["id"], "login": dave, "display_name": "Dave"}


def test_a_new_identity_is_not_refused_by_what_a_worker_cached_about_its_id(database: Any, server: Any) -> None:
    """Each worker caches "no such identity" for an id it was asked about; creating one with that id
    moves the access generation, so the cache does not refuse its tokens."""
    from conftest import make_token

    ((unused,),) = database.query("SELECT coalesce(max(id), 0) + 1000 FROM attune.identity")
    key = str(uuid.uuid4())
    token = make_token(unused, key=key)
    ghost = Api(server.base_url, token)
    # Asked on every worker (concurrent bursts reach both): each caches that the id does not exist.
    for _ in range(8):
        assert ghost.get("/api/v1/packs").json()["code"] == "IDENTITY_DELETED"
    database.query("INSERT INTO attune.identity (id, login, token_key) VALUES (%s, %s, %s)",
                   (unused, f"late-{uuid.uuid4().hex[:8]}", key))
    created_at = time.monotonic()
    wait_until(lambda: all(ghost.get("/api/v1/packs").status_code == 200 for _ in range(8)),
               REVOCATION_SECONDS, "the new identity accepted on every worker")
    print(f"a new identity's token accepted after {(time.monotonic() - created_at) * 1000:.0f} ms")
