"""Routes and admission control: a request whose path matches another group's
``routes`` is handed (connection and the bytes already read) to that group's
workers; ``max_pending`` and ``max_queue_wait`` answer 503 with Retry-After;
``fastpool status`` counts the handoffs; bad route configs are refused.

Every server is the real ``python -m fastpool serve --config FILE``
(clusters.Clusters); the apps are apps_routes.py (every response
says, as JSON, which group served it and on which client port).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from client import Client, connect, get, post, start_sleeper, timed
from clusters import (
    Clusters,
    Load,
    fastpool,
    group,
    new_clusters,
    ports,
    render,
    routed_group,
    served,
)
from conftest import alive, wait_for

# ---------------------------------------------------------------- helpers


def counts(server, cli: bool = True) -> dict[str, dict[str, object]]:
    """The routing figures of each group: from ``fastpool status --json``, or
    (``cli=False``, for polling) straight from the control socket."""
    if cli:
        result = server.fastpool("status", "--json")
        assert result.returncode == 0, result.stderr
        groups = json.loads(result.stdout)["groups"]
    else:
        groups = server.status()["groups"]
    return {g["name"]: {key: g[key] for key in
                        ("routes", "handed_in", "handed_out", "shed", "pending")}
            for g in groups}


# ---------------------------------------------------------------- the routed server

# web (WSGI, the listener), task (WSGI, /tast, 2 workers), api (ASGI, /api).


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    factory, directory = new_clusters(tmp_path_factory, "routed")
    chosen = ports("web")
    text = render(
        server={"health_path": "/healthz",
                "control_socket": str(directory / ".fastpool.sock")},
        groups={"web": group(chosen["web"], 1, app="apps_routes:web"),
                "task": routed_group("apps_routes:task", ["/tast"], 2),
                "api": routed_group("apps_routes:api", ["/api"], 1)})
    server = factory.start(text, workers=4, ports=chosen)
    try:
        server.wait_group("web", 1)
        server.wait_group("task", 2)
        server.wait_group("api", 1)
        server.web = chosen["web"]
        yield server
    finally:
        factory.close()


ROUTING = [
    # (request-target, group, why)
    ("/", "web", "no route"),
    ("/tast", "task", "the prefix itself"),
    ("/tast/", "task", "the prefix and a slash"),
    ("/tast/x/y", "task", "below the prefix"),
    ("/tasty", "web", "not a whole segment"),
    ("/tasty/x", "web", "not a whole segment, deeper"),
    ("/%74ast", "task", "percent-encoded"),
    ("/%74ast/x", "task", "percent-encoded, below"),
    ("/./tast", "task", "a dot segment"),
    ("/%2e/tast", "task", "an encoded dot segment"),
    ("//tast", "task", "a repeated slash"),
    ("/x/../tast", "task", "a dot-dot segment"),
    ("/tast/../x", "web", "dot-dot out of the route"),
    ("/tast?a=1&b=/api", "task", "a query string"),
    ("/?next=/tast", "web", "the route only in the query"),
    ("/api", "api", "the ASGI group"),
    ("/api/z?q=1", "api", "below, with a query"),
    ("/apix", "web", "not a whole segment (ASGI route)"),
]


@pytest.mark.parametrize(("target", "expected", "why"), ROUTING,
                         ids=[f"{t}->{g}" for t, g, _ in ROUTING])
def test_routing_by_prefix(routed, target, expected, why):
    described = served(Client.once(routed.web, target))
    assert described["group"] == expected, (target, why, described)
    assert described["query"] == (target.split("?", 1)[1] if "?" in target else "")


def test_keep_alive_moves_between_groups_on_one_connection(routed):
    path = ["/", "/tast/a", "/b", "/api/c", "/tast/d", "/api/e", "/f"]
    with Client(routed.web) as client:
        seen = []
        for target in path:
            described = served(client.send(target))
            # The same TCP connection, whichever group answered; its
            # addresses travel with every handoff (the sender's, then the
            # message's: no worker but the first asks the socket).
            assert described["client_port"] == client.port, (target, described)
            assert described["client_host"] == "127.0.0.1", (target, described)
            assert described["server_port"] == routed.web, (target, described)
            assert described["path"] == target
            seen.append(described["group"])
    assert seen == ["web", "task", "web", "api", "task", "api", "web"]


def test_pipelined_requests_across_groups_stay_in_order(routed):
    body = b"pipelined body \x00\xff " * 5
    data = (get("/one")
            + post("/tast/p", body)
            + get("/api/z")
            + post("/tast/q", b"second")
            + get("/last", extra="Connection: close\r\n"))
    sock, stream = connect(routed.web)
    with sock:
        sock.sendall(data)
        responses = [stream.response() for _ in range(5)]
        stream.assert_closed()
    described = [served(r) for r in responses]
    assert [(d["group"], d["method"], d["path"]) for d in described] == [
        ("web", "GET", "/one"), ("task", "POST", "/tast/p"), ("api", "GET", "/api/z"),
        ("task", "POST", "/tast/q"), ("web", "GET", "/last")]
    assert described[1]["body"] == body.decode("latin-1")
    assert described[3]["body"] == "second"
    assert len({d["client_port"] for d in described}) == 1


@pytest.mark.parametrize("first", [None, "/api/a", "/tast/a"],
                         ids=["fresh-from-web", "from-asgi-api", "within-task"])
@pytest.mark.parametrize("route", ["/tast", "/api"])
def test_large_post_body_crosses_a_handoff_intact(routed, route, first):
    body = os.urandom(300 * 1024)
    with Client(routed.web) as client:
        if first is not None:
            served(client.send(first))
        response = client.send(f"{route}/upload", "POST", body)
        described = served(response)
        assert described["group"] == {"/tast": "task", "/api": "api"}[route]
        assert described["length"] == len(body)
        assert described["sha256"] == hashlib.sha256(body).hexdigest()
        # The connection goes on, back to its home group.
        assert served(client.send("/after"))["group"] == "web"


def test_large_post_pipelined_with_requests_for_other_groups(routed):
    body = os.urandom(300 * 1024)
    data = (post("/tast/upload", body)
            + post("/api/next", b"small")
            + get("/", extra="Connection: close\r\n"))
    sock, stream = connect(routed.web)
    with sock:
        sock.sendall(data)
        described = [served(stream.response()) for _ in range(3)]
        stream.assert_closed()
    assert [d["group"] for d in described] == ["task", "api", "web"]
    assert described[0]["length"] == len(body)
    assert described[0]["sha256"] == hashlib.sha256(body).hexdigest()
    assert described[1]["body"] == "small"


def test_health_path_is_answered_in_every_group_and_never_routed(routed):
    response = Client.once(routed.web, "/healthz")
    assert (response.status, response.body) == (200, b"OK\n")
    before = counts(routed)
    with Client(routed.web) as client:
        assert served(client.send("/tast/a"))["group"] == "task"
        # Now in a task worker: it answers the health check itself.
        response = client.send("/healthz")
        assert (response.status, response.body) == (200, b"OK\n")
        assert served(client.send("/tast/b"))["group"] == "task"
        assert served(client.send("/api/c"))["group"] == "api"
        response = client.send("/healthz")       # in the ASGI group
        assert (response.status, response.body) == (200, b"OK\n")
        assert served(client.send("/api/d"))["group"] == "api"
    after = counts(routed)
    # web -> task -> api, and nothing more: neither health check moved it.
    assert after["web"]["handed_out"] - before["web"]["handed_out"] == 1
    assert after["task"]["handed_in"] - before["task"]["handed_in"] == 1
    assert after["task"]["handed_out"] - before["task"]["handed_out"] == 1
    assert after["api"]["handed_in"] - before["api"]["handed_in"] == 1
    assert after["api"]["handed_out"] - before["api"]["handed_out"] == 0


def test_check_prints_the_routes(routed):
    result = fastpool("check", "--config", str(routed.config), cwd=routed.cwd)
    assert result.returncode == 0, result.stderr
    lines = {line.split(":", 1)[0]: line for line in result.stdout.splitlines()}
    assert "routes /tast" in lines["group task"], result.stdout
    assert "routes /api" in lines["group api"], result.stdout
    assert ", routes" not in lines["group web"], result.stdout
    assert result.stdout.rstrip().endswith("OK")


def test_a_handoff_during_reloads_loses_nothing(routed):
    """A stream of /tast requests (new connections and a keep-alive one) while
    the task group is reloaded, then every group (SIGHUP): all answered 200."""
    old_task = routed.group_pids("task")
    with Load(routed.web, fresh=2, keep_alive=1, path="/tast/r", limit=30) as load:
        wait_for(lambda: load.count_since(0) >= 20, what="the stream to run")
        result = routed.fastpool("reload", "--group", "task")
        assert result.returncode == 0, result.stderr
        new_task = routed.wait_group("task", 2, exclude=set(old_task))
        wait_for(lambda: not any(map(alive, old_task)), what="the old task workers to exit")
        moment = time.monotonic()
        wait_for(lambda: load.count_since(moment) >= 20, what="requests after the reload")
        assert load.pids_since(moment) <= set(new_task)
        # Every group at once: the listener's workers too.
        old_all = {name: routed.group_pids(name) for name in ("web", "task", "api")}
        routed.proc.send_signal(signal.SIGHUP)
        for name, pids in old_all.items():
            routed.wait_group(name, len(pids), exclude=set(pids))
        wait_for(lambda: not any(alive(p) for pids in old_all.values() for p in pids),
                 what="the old workers to exit")
        moment = time.monotonic()
        wait_for(lambda: load.count_since(moment) >= 20, what="requests after SIGHUP")
    assert load.failures() == [], load.failures()[:5]
    assert load.pids_since(0) & set(old_task) and load.pids_since(0) & set(new_task)
    assert counts(routed)["task"]["pending"] == 0


def test_a_draining_worker_still_hands_over_the_request_it_reads(routed):
    """A request for another group that a worker reads after its graceful stop
    began (here: it arrived while the worker was busy, and the web group was
    reloaded meanwhile) is handed over, not dropped."""
    port = routed.web
    old = routed.group_pids("web")
    with Client(port) as client, ThreadPoolExecutor(1) as pool:
        assert served(client.send("/"))["group"] == "web"     # idle in the web worker
        slow = start_sleeper(pool, routed, 2.0, port=port)
        client.sock.sendall(get("/tast/after"))
        result = routed.fastpool("reload", "--group", "web")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: any(w["pid"] in old and w["state"] in ("retiring", "draining")
                             for w in routed.group_status("web")["workers"]),
                 what="the old web worker to begin its graceful stop")
        assert not slow.done(), "the slow request ended before the old worker drained"
        try:
            response = client.stream.response()
        except EOFError:
            raise AssertionError("the draining web worker closed the connection without "
                                 "handing /tast/after to the task group") from None
        assert served(response)["group"] == "task"
        assert served(slow.result(timeout=20))["group"] == "web"
    routed.wait_group("web", 1, exclude=set(old))


# ---------------------------------------------------------------- admission control

# web (listener, 1 worker), task (/tast, 1 worker, max_pending 1, Retry-After 7),
# queue (/queue, 1 worker, max_queue_wait 0.3 s, the default Retry-After 5).


@pytest.fixture(scope="module")
def admission(tmp_path_factory):
    factory, directory = new_clusters(tmp_path_factory, "admission")
    chosen = ports("web")
    text = render(
        server={"control_socket": str(directory / ".fastpool.sock")},
        groups={"web": group(chosen["web"], 1, app="apps_routes:web"),
                "task": routed_group("apps_routes:task", ["/tast"], 1, max_pending=1,
                                     retry_after=7),
                "queue": routed_group("apps_routes:queue", ["/queue"], 1,
                                      max_queue_wait=0.3)})
    server = factory.start(text, workers=3, ports=chosen)
    try:
        for name in ("web", "task", "queue"):
            server.wait_group(name, 1)
        server.web = chosen["web"]
        for target in ("/", "/tast/warm", "/queue/warm"):   # every worker has served
            served(Client.once(server.web, target))
        yield server
    finally:
        factory.close()


def test_a_full_group_sheds_at_once_and_others_still_answer(admission):
    port = admission.web
    with ThreadPoolExecutor(2) as pool:
        # keeps the task group's only worker busy
        busy = start_sleeper(pool, admission, 2.0, port=port, route="/tast/sleep")
        queued = pool.submit(Client.once, port, "/tast/queued", "GET", b"", 20)
        wait_for(lambda: counts(admission, cli=False)["task"]["pending"] == 1,
                 what="one handoff waiting for the task group")
        shed = [timed(Client.once, port, "/tast/more") for _ in range(3)]
        others = [timed(Client.once, port, target) for target in ("/", "/queue/x", "/")]
        assert not busy.done() and not queued.done(), "the flood ended too early"
        slow_result = busy.result(timeout=20)
        queued_result = queued.result(timeout=20)
    for _, response in shed:
        assert response.status == 503, response
        assert response.header("retry-after") == "7"
        assert response.header("connection") == "close"
    for (_, response), expected in zip(others, ("web", "queue", "web"), strict=True):
        assert served(response)["group"] == expected
    # The shed requests and the other groups never waited for the busy one.
    assert max(t for t, _ in shed) < 0.05, [round(t, 4) for t, _ in shed]
    assert max(t for t, _ in others) < 0.1, [round(t, 4) for t, _ in others]
    # The queued handoff was not lost: it was served once the worker was free.
    assert served(slow_result)["group"] == "task"
    assert served(queued_result)["group"] == "task"
    wait_for(lambda: counts(admission)["task"]["pending"] == 0, what="an empty task queue")


def test_a_handoff_whose_client_left_while_queued_costs_nothing(admission):
    """The client gives up (and resets) while its connection waits in the task
    group's queue: the worker that takes it later finds it gone, and serves on."""
    port = admission.web
    with ThreadPoolExecutor(2) as pool:
        busy = start_sleeper(pool, admission, 1.0, port=port, route="/tast/sleep")
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(get("/tast/gone", extra="Connection: close\r\n"))
        wait_for(lambda: counts(admission, cli=False)["task"]["pending"] == 1,
                 what="the handoff waiting for the task group")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        assert served(busy.result(timeout=20))["group"] == "task"
    wait_for(lambda: counts(admission, cli=False)["task"]["pending"] == 0,
             what="the gone client's handoff to be taken")
    assert served(Client.once(port, "/tast/after"))["group"] == "task"
    assert "Traceback" not in admission.log


def test_max_queue_wait_answers_503_to_a_handoff_that_waited_too_long(admission):
    port = admission.web
    with ThreadPoolExecutor(2) as pool:
        busy = start_sleeper(pool, admission, 1.0, port=port, route="/queue/sleep")
        start = time.monotonic()
        late = pool.submit(Client.once, port, "/queue/late", "GET", b"", 20)
        response = late.result(timeout=20)
        took = time.monotonic() - start
        assert served(busy.result(timeout=20))["group"] == "queue"
    assert response.status == 503, response
    assert response.header("retry-after") == "5"
    # Answered by the queue group's worker once it was free, not by the sender.
    assert took > 0.3, took
    # A handoff that is taken at once is served.
    assert served(Client.once(port, "/queue/fresh"))["group"] == "queue"


def test_status_counts_handoffs_and_shed_requests(admission):
    port = admission.web
    before = counts(admission)
    for target in ("/tast/1", "/tast/2", "/queue/1", "/plain"):
        Client.once(port, target)
    with ThreadPoolExecutor(2) as pool:
        busy = start_sleeper(pool, admission, 2.0, port=port, route="/tast/sleep")
        queued = pool.submit(Client.once, port, "/tast/queued", "GET", b"", 20)
        wait_for(lambda: counts(admission, cli=False)["task"]["pending"] == 1,
                 what="one handoff waiting for the task group")
        assert Client.once(port, "/tast/shed").status == 503
        full = counts(admission)
        text = admission.fastpool("status")
        assert not busy.done(), "the slow request ended before the status was read"
        busy.result(timeout=20)
        queued.result(timeout=20)
    wait_for(lambda: all(g["pending"] == 0 for g in counts(admission, cli=False).values()),
             what="no pending handoffs")
    at_rest = counts(admission)
    assert at_rest["task"]["routes"] == ["/tast"]
    assert at_rest["queue"]["routes"] == ["/queue"]
    assert at_rest["web"]["routes"] == []
    # 4 handed to task (2 quick ones, the slow one, the queued one) + 1 to queue;
    # the shed one is not handed over.
    out = {name: at_rest[name]["handed_out"] - before[name]["handed_out"] for name in at_rest}
    into = {name: at_rest[name]["handed_in"] - before[name]["handed_in"] for name in at_rest}
    assert out == {"web": 5, "task": 0, "queue": 0}, (before, at_rest)
    assert into == {"web": 0, "task": 4, "queue": 1}, (before, at_rest)
    shed = sum(at_rest[name]["shed"] - before[name]["shed"] for name in at_rest)
    assert shed == 1, (before, at_rest)
    assert full["task"]["pending"] == 1
    # The human form.
    assert text.returncode == 0, text.stderr
    task_line = next(line for line in text.stdout.splitlines()
                     if line.strip().startswith("routes: /tast"))
    assert task_line.strip() == (
        f"routes: /tast; handed in {full['task']['handed_in']}, handed out "
        f"{full['task']['handed_out']}, shed (503) {full['task']['shed']}, pending now 1")


# ---------------------------------------------------------------- drain


def test_health_path_answers_503_once_the_graceful_stop_began(tmp_path):
    """An idle keep-alive connection in the web group, and one that moved to
    the task group, each behind a worker busy with a slow request: after
    SIGTERM their health checks get 503 (the worker reads them once the slow
    request is done, its graceful stop begun), and the slow requests finish."""
    factory = Clusters(tmp_path)
    chosen = ports("web")
    text = render(
        server={"health_path": "/healthz", "graceful_timeout": 15,
                "control_socket": str(tmp_path / ".fastpool.sock")},
        groups={"web": group(chosen["web"], 1, app="apps_routes:web"),
                "task": routed_group("apps_routes:task", ["/tast"], 1)})
    port = chosen["web"]
    try:
        server = factory.start(text, workers=2, ports=chosen)
        server.wait_group("task", 1)
        with Client(port) as in_web, Client(port) as in_task, ThreadPoolExecutor(2) as pool:
            response = in_web.send("/healthz")
            assert (response.status, response.body) == (200, b"OK\n")
            assert served(in_task.send("/tast/a"))["group"] == "task"
            response = in_task.send("/healthz")
            assert (response.status, response.body) == (200, b"OK\n")
            # task first: the web worker hands it over before it is busy itself.
            slow = [start_sleeper(pool, server, 1.5, port=port, route=f"{route}/sleep")
                    for route in ("/tast", "")]
            server.proc.send_signal(signal.SIGTERM)
            for client in (in_web, in_task):
                client.sock.sendall(get("/healthz"))
            for name, client in (("web", in_web), ("task", in_task)):
                health = client.stream.response()
                assert (health.status, health.body) == (503, b"stopping\n"), (name, health)
                assert health.header("connection") == "close", (name, health)
                client.stream.assert_closed()
            assert [served(f.result(timeout=20))["group"] for f in slow] == ["task", "web"]
        assert server.proc.wait(20) == 0
    finally:
        factory.close()


# ---------------------------------------------------------------- config errors

BAD_ROUTES = {
    "route-without-slash": (
        {"task": {"routes": ["tast"]}}, ["[group.task] routes", "'tast'"]),
    "prefix-claimed-twice": (
        {"task": {"routes": ["/tast"]}, "other": {"routes": ["/tast/"]}},
        ["'/tast/'", "[group.task]", "[group.other]"]),
    "routes-but-no-listener": (
        {"task": {"routes": ["/tast"]}, "api": {"routes": ["/api"]}},
        ["no group has a listen address"]),
}


@pytest.mark.parametrize("case", list(BAD_ROUTES))
def test_bad_routes_are_refused_before_anything_starts(tmp_path, case):
    tables, parts = BAD_ROUTES[case]
    groups = {} if case == "routes-but-no-listener" else {
        "web": group(18393, 1, app="apps_routes:web")}      # never bound
    for name, more in tables.items():
        groups[name] = {"app": "apps_routes:task", "workers": 1, **more}
    config = tmp_path / "fastpool.toml"
    config.write_text(render(groups=groups))
    result = fastpool("serve", "--config", str(config), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    for part in parts:
        assert part in lines[0], (part, lines[0])
    assert "Booting worker" not in output and "Traceback" not in output
    assert not (tmp_path / ".fastpool.sock").exists()
