"""Metrics (``metrics_listen``), the app's prometheus_client metrics, max_rss and
``fastpool status --watch``: black-box through the real CLI, scraped over HTTP.

Every figure is checked against what the test itself sent: counts by status
class and by who answered, the histogram, workers by state, restarts by
cause, and that no counter ever goes backwards while workers are killed."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from client import raw_request
from conftest import child_env, free_port, wait_for

pytest.importorskip("prometheus_client")

APPS = {"wsgi": "apps_metrics:app", "asgi": "apps_metrics:asgi"}
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(port: int, path: str = "/metrics", method: str = "GET",
           accept: str | None = None) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, headers={"Accept": accept} if accept else {})
        response = conn.getresponse()
        body = response.read().decode()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        labels = frozenset(LABEL.findall(match[2] or ""))
        found[(match[1], labels)] = float(match[3])
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def metrics_server(serve, interface: str, *args: str, workers: int = 1):
    port = free_port()
    server = serve(APPS[interface], "--interface", interface, "--metrics-bind",
                   f"127.0.0.1:{port}", *args, workers=workers)
    server.metrics_port = port
    return server


@pytest.mark.parametrize("interface", list(APPS))
def test_counts_by_status_and_served_by(serve, tmp_path: Path, interface: str) -> None:
    (tmp_path / "public").mkdir()
    (tmp_path / "public" / "a.txt").write_text("static")
    server = metrics_server(serve, interface, "--health-path", "/healthz", "--static",
                            "/s=public")
    port = server.port
    for _ in range(3):
        assert get(port, "/hello") == 200
    assert get(port, "/missing") == 404
    assert get(port, "/fail") == 500
    assert get(port, "/healthz") == 200
    assert get(port, "/s/a.txt") == 200
    answer = raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")

    def counted() -> dict | None:
        found = samples(scrape(server.metrics_port)[2])
        done = value(found, "fastpool_request_duration_seconds_count", group="main")
        return found if done >= 7 and value(found, "fastpool_requests_total", group="main",
                                            status="4xx", served_by="error") else None

    found = wait_for(counted, what="the responses to be counted")
    by = {"group": "main"}
    assert value(found, "fastpool_requests_total", **by, status="2xx", served_by="app") == 3
    assert value(found, "fastpool_requests_total", **by, status="4xx", served_by="app") == 1
    assert value(found, "fastpool_requests_total", **by, status="5xx", served_by="app") == 1
    assert value(found, "fastpool_requests_total", **by, status="2xx", served_by="health") == 1
    assert value(found, "fastpool_requests_total", **by, status="2xx", served_by="static") == 1
    assert value(found, "fastpool_requests_total", **by, status="4xx", served_by="error") == 1
    # The histogram: every request with a known start, buckets cumulative up to +Inf.
    buckets = sorted(((float(dict(labels)["le"]), count) for (name, labels), count
                      in found.items() if name == "fastpool_request_duration_seconds_bucket"))
    assert len(buckets) == 17 and buckets[0][0] == 0.0005 and buckets[-1][0] == float("inf")
    assert [c for _, c in buckets] == sorted(c for _, c in buckets)
    assert buckets[-1][1] == value(found, "fastpool_request_duration_seconds_count", **by) == 7
    assert 0 < value(found, "fastpool_request_duration_seconds_sum", **by) < 7
    assert value(found, "fastpool_workers", **by, state="idle") == 1
    assert value(found, "fastpool_workers", **by, state="busy") == 0
    listener = f"http://127.0.0.1:{port}"
    assert value(found, "fastpool_listen_backlog", **by, listener=listener) == 2048
    assert (("fastpool_listen_queue", frozenset({**by, "listener": listener}.items()))
            in found)
    assert value(found, "fastpool_worker_resident_memory_bytes", **by, slot="0") > 1 << 20
    # The app's own counter, from the worker, merged by the master.
    assert value(found, "app_requests_total", path="/hello") == 3


def test_exposition_formats_and_errors(serve) -> None:
    server = metrics_server(serve, "wsgi")
    get(server.port, "/hello")
    status, headers, body = scrape(server.metrics_port)
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE fastpool_requests_total counter" in body
    assert "# TYPE fastpool_request_duration_seconds histogram" in body
    status, headers, body = scrape(server.metrics_port,
                                   accept="application/openmetrics-text; version=1.0.0")
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith("# EOF\n") and body.count("# EOF") == 1
    assert "# TYPE fastpool_requests counter" in body
    assert "# TYPE app_requests counter" in body
    status, headers, body = scrape(server.metrics_port, method="HEAD")
    assert status == 200 and body == "" and int(headers["content-length"]) > 100
    assert scrape(server.metrics_port, path="/")[0] == 404
    status, headers, _ = scrape(server.metrics_port, method="POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    # A scraper that sends half a request and stalls does not hold the master.
    with socket.create_connection(("127.0.0.1", server.metrics_port)) as stalled:
        stalled.sendall(b"GET /metrics HTTP/1.1\r\n")
        start = time.monotonic()
        assert scrape(server.metrics_port)[0] == 200
        assert time.monotonic() - start < 2


@pytest.mark.parametrize("interface", list(APPS))
def test_scrape_answers_while_every_worker_is_busy(serve, interface: str) -> None:
    workers, slow = 2, 3.0
    # One shared socket: an idle worker takes the next connection, so two
    # requests keep both busy (SO_REUSEPORT could queue both on one worker).
    server = metrics_server(serve, interface, "--no-reuse-port", workers=workers)
    calls = workers if interface == "wsgi" else 4     # an ASGI worker runs many at once
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(get(server.port, f"/slow?{slow}")))
               for _ in range(calls)]
    started = time.monotonic()
    for count, thread in enumerate(threads, 1):
        # One at a time: a WSGI worker accepts a batch of waiting connections
        # at once, but none while its app runs, so the next one goes elsewhere.
        thread.start()
        wait_for(lambda count=count: value(samples(scrape(server.metrics_port)[2]),
                                           "fastpool_requests_in_flight", group="main") == count,
                 timeout=slow, what=f"{count} request(s) in flight")

    def all_busy() -> dict | None:
        found = samples(scrape(server.metrics_port)[2])
        # (An ASGI worker may take all four: busy counts loops running app code.)
        busy = workers if interface == "wsgi" else 1
        return found if value(found, "fastpool_requests_in_flight", group="main") == calls \
            and value(found, "fastpool_workers", group="main", state="busy") >= busy \
            else None

    found = wait_for(all_busy, timeout=slow, what="every worker to be busy")
    assert time.monotonic() - started < slow, "the scrape waited for the workers"
    busy = value(found, "fastpool_workers", group="main", state="busy")
    assert value(found, "fastpool_workers", group="main", state="idle") == workers - busy
    for thread in threads:
        thread.join()
    assert answers == [200] * calls


def test_counters_never_go_backwards_across_kill_9(serve) -> None:
    server = metrics_server(serve, "wsgi", "--keep-alive", "0", workers=2)
    sent = ok = 0
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        nonlocal sent, ok
        while not stop.is_set():
            with lock:
                sent += 1
            try:
                if get(server.port, "/hello") == 200:
                    with lock:
                        ok += 1
            except OSError:
                pass

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    history = []
    killed = 0
    try:
        deadline = time.monotonic() + 4.0
        next_kill = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            history.append(samples(scrape(server.metrics_port)[2]))
            if time.monotonic() >= next_kill and killed < 2:
                os.kill(server.worker_pids()[0], signal.SIGKILL)
                killed += 1
                next_kill += 1.2
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    def settled() -> dict | None:
        found = samples(scrape(server.metrics_port)[2])
        return found if value(found, "fastpool_workers", group="main", state="idle") == 2 \
            else None

    history.append(wait_for(settled, what="two idle workers again"))
    final = history[-1]
    assert killed == 2
    for before, after in zip(history, history[1:], strict=False):
        for key, number in before.items():
            name = key[0]
            if name.endswith(("_total", "_bucket", "_count", "_sum")):
                assert after.get(key, 0.0) >= number, f"{key} went from {number} to {after[key]}"
    served = value(final, "fastpool_requests_total", group="main", status="2xx",
                   served_by="app")
    assert ok <= served <= sent, (ok, served, sent)
    assert value(final, "fastpool_worker_restarts_total", group="main", cause="signal") == 2
    # The app's own counter survives its workers too (folded when they die).
    assert ok <= value(final, "app_requests_total", path="/hello") <= sent
    assert value(final, "fastpool_worker_cpu_seconds_total", group="main", slot="0") > 0


def test_recycled_workers_fold_their_app_metrics(serve, tmp_path: Path) -> None:
    directory = tmp_path / "prom"
    port = free_port()
    server = serve(APPS["wsgi"], "--metrics-bind", f"127.0.0.1:{port}", "--max-requests", "2",
                   env={"PROMETHEUS_MULTIPROC_DIR": str(directory)})
    requests = 40
    for _ in range(requests):
        wait_for(lambda: get(server.port, "/hello") == 200, what="an answer")

    def recycled() -> dict | None:
        found = samples(scrape(port)[2])
        return found if value(found, "fastpool_worker_restarts_total", group="main",
                              cause="max_requests") >= requests // 2 - 1 else None

    found = wait_for(recycled, what="the workers to be recycled")
    assert value(found, "app_requests_total", path="/hello") == requests
    assert value(found, "fastpool_requests_total", group="main", status="2xx",
                 served_by="app") == requests
    # The live worker's file, the master's own (empty) one, the folded counters.
    files = sorted(p.name for p in directory.iterdir())
    assert len(files) <= 4, files
    assert "counter_fastpool-folded.db" in files


def test_private_directory_is_created_and_removed(serve) -> None:
    server = metrics_server(serve, "wsgi")
    path = re.search(r"app metrics: (\S+)\)", server.log)[1]
    assert Path(path).is_dir() and Path(path).name.startswith("fastpool-prometheus-")
    server.stop()
    assert not Path(path).exists()


def test_max_rss_recycles_gracefully(serve) -> None:
    server = metrics_server(serve, "wsgi", "--max-rss", "70")
    first = server.worker_pids()
    assert get(server.port, "/grow") == 200

    def replaced() -> dict | None:
        found = samples(scrape(server.metrics_port)[2])
        return found if value(found, "fastpool_worker_restarts_total", group="main",
                              cause="max_rss") == 1 else None

    wait_for(replaced, timeout=10, what="the worker to be recycled for max_rss")
    wait_for(lambda: server.worker_pids() and server.worker_pids() != first,
             what="a new worker")
    assert get(server.port, "/hello") == 200
    assert re.search(rf"Worker 0 \(pid {first[0]}\) of group main uses \d+ MiB "
                     r"\(max_rss 70 MiB\): replacing it gracefully", server.log)


def test_reload_counts_as_a_restart(tmp_path: Path) -> None:
    port = free_port()
    proc_port = free_port()
    (tmp_path / "fastpool.toml").write_text(
        f'[server]\nmetrics_listen = "127.0.0.1:{port}"\n[group.main]\n'
        f'app = "apps_metrics:app"\nworkers = 2\nlisten = ["127.0.0.1:{proc_port}"]\n')
    proc = subprocess.Popen([sys.executable, "-m", "fastpool", "serve", "--config",
                             "fastpool.toml"], cwd=tmp_path, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _answers(proc_port), what="the server")
        subprocess.run([sys.executable, "-m", "fastpool", "reload"], cwd=tmp_path,
                       env=child_env(), check=True, capture_output=True)

        def reloaded() -> bool:
            found = samples(scrape(port)[2])
            return value(found, "fastpool_worker_restarts_total", group="main",
                         cause="reload") == 2
        wait_for(reloaded, what="two workers replaced by the reload")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def _answers(port: int) -> bool:
    try:
        return get(port, "/hello") == 200
    except OSError:
        return False


def test_status_watch(serve) -> None:
    server = metrics_server(serve, "wsgi")
    control = server.log_path.parent / ".fastpool.sock"
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            get(server.port, "/hello")

    thread = threading.Thread(target=load)
    thread.start()
    try:
        watch = subprocess.Popen([sys.executable, "-m", "fastpool", "status", "--watch",
                                  "--control-socket", str(control)],
                                 stdout=subprocess.PIPE, text=True, env=child_env())
        frames = []
        deadline = time.monotonic() + 10
        while len(frames) < 3 and time.monotonic() < deadline:
            line = watch.stdout.readline()
            if line.startswith("  req/s"):
                frames.append(line)
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0
    finally:
        stop.set()
        thread.join()
    assert len(frames) == 3, frames
    assert frames[0].startswith("  req/s -")      # no rate before a second frame
    rate = float(re.match(r"  req/s (\S+)", frames[2])[1])
    assert rate > 0
    assert re.search(r"p50 [\d.]+ ms  p99 [\d.]+ ms  in flight \d+  connections \d+  shed 0  "
                     r"pending 0  listen queue \d+/2048  restarts 0", frames[2])


def test_metrics_listen_errors(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = free_port()
    try:
        for address, code, expected in (
                ("nohost:", 2, "Error: metrics_listen: 'nohost:' has no valid port"),
                (f"127.0.0.1:{port}", 2, "is also an address of group 'main'"),
                (f"127.0.0.1:{taken.getsockname()[1]}", 1,
                 f"metrics_listen: cannot listen on 127.0.0.1:{taken.getsockname()[1]}: "
                 "Address already in use")):
            result = subprocess.run(
                [sys.executable, "-m", "fastpool", "serve", "apps_metrics:app", "--port",
                 str(port), "--metrics-bind", address], cwd=tmp_path, env=child_env(),
                capture_output=True, text=True, timeout=30)
            assert result.returncode == code, result.stderr
            errors = [line for line in result.stderr.splitlines()
                      if "Error" in line or "ERROR" in line]
            assert len(errors) == 1 and expected in errors[0], result.stderr
    finally:
        taken.close()
