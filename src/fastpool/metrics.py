"""Metrics: what the workers count, gathered by the master, served on ``metrics_listen``.

Rules of this module:

* The workers count in their scoreboard records (``fastpool._worker``'s
  ``BOARD_*`` layout: responses by status class and by who answered, the
  request duration histogram, in-flight requests, open connections, handoffs,
  shed requests) with a few additions in shared memory per request and no
  Python call.  That costs the same whether ``metrics_listen`` is set or not,
  so it is always on: ``fastpool status --watch`` reads the same counts.
* Only the master reads them, and only the master serves them
  (``MetricsServer``, non-blocking, from the master's own loop): a scrape is
  answered while every worker is busy, hung or crash-looping.  Nothing here
  runs in a worker.
* Counters never go backwards.  When a worker exits, the master adds its
  record's counters to its group's ``Totals`` before the record is reused,
  and its CPU time (from ``wait4``) to its slot's; a live figure is the
  totals plus the live records.
* ``snapshot`` gathers every number once, as plain data (the ``status``
  reply carries it); ``exposition`` writes it in the Prometheus text format
  0.0.4 or, when the scraper asks for it, OpenMetrics 1.0.0.
* The app's own ``prometheus_client`` metrics (``AppMetrics``) live in a
  multiprocess directory the master creates per start (unless the operator set
  ``PROMETHEUS_MULTIPROC_DIR``) and sets for every worker before any app is
  imported.  When a worker exits, the master marks it dead and folds its
  counter, histogram, summary and gauge files into one file per kind, so the
  directory holds the live workers' files plus a fixed few, however many
  workers were recycled.  ``prometheus_client`` stays optional: without it
  the app cannot use it, and fastpool's own metrics are served all the same.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastpool.master import Group, Master

log = logging.getLogger("fastpool.error")

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TEXT = "application/openmetrics-text; version=1.0.0; charset=utf-8"
METRICS_PATH = "/metrics"
REQUEST_LIMIT = 8192       # a scrape's request head: Prometheus sends about 300 bytes
SCRAPE_TIMEOUT = 10.0      # a scraper that has not sent its request (or read the answer) by then
MAX_SCRAPERS = 64          # connections at once; more wait in the listen queue
LISTEN_BACKLOG = 64
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# struct tcp_info (linux/tcp.h): eight one-byte fields, then 32-bit ones; on
# a listening socket tcpi_unacked is its accept queue's length now and
# tcpi_sacked the queue's limit (the backlog).
TCP_INFO_HEAD = struct.Struct("=8B6I")
TCP_INFO_UNACKED, TCP_INFO_SACKED = 12, 13
RESTART_CAUSES = ("exit", "signal", "timeout", "max_requests", "max_rss", "reload", "crash_loop")
WORKER_STATES = ("booting", "idle", "busy", "draining")
STATUS_CLASS_NAMES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def board_layout() -> tuple[dict[str, int], tuple[float, ...], dict[int, str]]:
    """The scoreboard layout, the histogram's bounds and the served-by names,
    from the compiled core (imported late: the master reports a missing core)."""
    from fastpool._worker import BOARD_LAYOUT, DURATION_BOUNDS, SERVED_BY_NAMES

    return BOARD_LAYOUT, DURATION_BOUNDS, SERVED_BY_NAMES


def counter_positions(layout: Mapping[str, int]) -> list[int]:
    """The doubles of a record that only grow (folded when a worker exits)."""
    responses = layout["status_classes"] * layout["served_kinds"]
    return [layout["requests"], layout["handed_in"], layout["handed_out"], layout["shed"],
            *range(layout["responses"], layout["responses"] + responses),
            *range(layout["durations"], layout["duration_sum"] + 1)]


@dataclasses.dataclass
class Totals:
    """A group's counts from its workers that have exited."""

    counts: list[float]
    restarts: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(RESTART_CAUSES, 0))
    cpu_seconds: dict[int, float] = dataclasses.field(default_factory=dict)   # by slot

    @classmethod
    def empty(cls) -> Totals:
        layout, _, _ = board_layout()
        return cls([0.0] * layout["size"])

    def fold(self, fields: tuple[float, ...], slot: int, cpu_seconds: float) -> None:
        """Add an exited worker's record and CPU time."""
        layout, _, _ = board_layout()
        for position in counter_positions(layout):
            self.counts[position] += fields[position]
        self.cpu_seconds[slot] = self.cpu_seconds.get(slot, 0.0) + cpu_seconds

    def restarted(self, cause: str) -> None:
        self.restarts[cause] += 1


# ---------------------------------------------------------------- reading /proc

def rss_bytes(pid: int) -> int | None:
    """The resident memory of ``pid``, or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (0 when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            # The command name (field 2) may hold spaces: count from its end.
            fields = handle.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return 0.0


def listen_queue(sock: socket.socket) -> tuple[int, int] | None:
    """(connections waiting in the accept queue, its limit) of a listening TCP
    socket, or None (a unix socket: Linux does not say)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        data = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_HEAD.size)
        fields = TCP_INFO_HEAD.unpack(data[:TCP_INFO_HEAD.size])
    except (OSError, struct.error):
        return None
    return fields[TCP_INFO_UNACKED], fields[TCP_INFO_SACKED]


# ---------------------------------------------------------------- one snapshot

def snapshot(master: Master) -> dict[str, Any]:
    """Every number, per group and per process set, as plain data."""
    layout, bounds, served_by = board_layout()
    positions = counter_positions(layout)
    groups: dict[str, Any] = {}
    for name, group in master.groups.items():
        counts = list(group.totals.counts)
        workers = dict.fromkeys(WORKER_STATES, 0)
        in_flight = connections = 0
        slots: dict[int, dict[str, float]] = {}
        for child in master.children.values():
            if child.kind != "worker" or child.name != name:
                continue
            fields = master.scoreboard.fields(child.board_slot)
            for position in positions:
                counts[position] += fields[position]
            in_flight += int(fields[layout["in_flight"]])
            connections += int(fields[layout["connections"]])
            state = master.scoreboard.states.get(int(fields[layout["state"]]), "booting")
            if child.retiring or state == "draining":
                workers["draining"] += 1
            elif not child.ready or state == "booting":
                workers["booting"] += 1
            else:
                workers["busy" if fields[layout["busy_since"]] else "idle"] += 1
            slot = slots.setdefault(child.slot, {"rss_bytes": 0, "cpu_seconds": 0.0})
            slot["rss_bytes"] += rss_bytes(child.pid) or 0
            slot["cpu_seconds"] += cpu_seconds(child.pid)
        for slot_index, seconds in group.totals.cpu_seconds.items():
            slots.setdefault(slot_index, {"rss_bytes": 0, "cpu_seconds": 0.0})
            slots[slot_index]["cpu_seconds"] += seconds
        responses = {}
        kinds = layout["served_kinds"]
        for index, class_name in enumerate(STATUS_CLASS_NAMES):
            for kind, kind_name in served_by.items():
                value = counts[layout["responses"] + index * kinds + kind]
                if value:
                    responses[f"{class_name} {kind_name}"] = int(value)
        durations = counts[layout["durations"]:layout["durations"] + len(bounds) + 1]
        listen = []
        for text, socks in _listening(group):
            waiting = limit = 0
            known = False
            for sock in socks:
                queue = listen_queue(sock)
                if queue is not None:
                    known = True
                    waiting += queue[0]
                    limit += queue[1]
            if known:
                listen.append({"listener": text, "queue": waiting, "backlog": limit})
        queues = master.queues
        groups[name] = {
            "requests": int(counts[layout["requests"]]),
            "responses": responses,
            "durations": [int(count) for count in durations],
            "duration_sum": counts[layout["duration_sum"]],
            "in_flight": in_flight, "connections": connections, "workers": workers,
            "restarts": dict(group.totals.restarts),
            "handed_in": int(counts[layout["handed_in"]]),
            "handed_out": int(counts[layout["handed_out"]]),
            "shed": int(counts[layout["shed"]]) + (queues.shed(name) if queues else 0),
            "pending": queues.pending(name) if queues else 0,
            "listen": listen,
            "slots": {str(slot): values for slot, values in sorted(slots.items())},
        }
    processes = {name: {"restarts": process.restarts,
                        "running": len(master.processes.instances(name))}
                 for name, process in master.processes.groups.items()}
    return {"bounds": list(bounds), "groups": groups, "processes": processes,
            "time": time.time()}


def _listening(group: Group) -> Iterator[tuple[str, list[socket.socket]]]:
    """Each address of a group with its sockets (one per slot with reuse_port)."""
    by_address: dict[str, list[socket.socket]] = {}
    listeners = group.listeners
    for bound in list(listeners.shared) + [b for own in listeners.per_slot.values()
                                           for b in own]:
        try:
            text = listeners.describe_one(bound)
        except OSError:
            continue
        by_address.setdefault(text, []).append(bound.sock)
    yield from by_address.items()


def quantile(bounds: list[float], counts: list[int], q: float) -> float | None:
    """The ``q`` quantile of a histogram's (non-cumulative) bucket counts,
    interpolated inside its bucket as Prometheus's histogram_quantile does."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if seen + count >= rank and count:
            if index >= len(bounds):
                return bounds[-1]          # above the last bound: say the last bound
            low = bounds[index - 1] if index else 0.0
            return low + (bounds[index] - low) * (rank - seen) / count
        seen += count
    return bounds[-1]


# ---------------------------------------------------------------- exposition

@dataclasses.dataclass
class Family:
    name: str                 # without _total for counters
    type: str                 # counter, gauge, histogram
    help: str
    samples: list[tuple[str, dict[str, str], float]]   # (suffix, labels, value)


def families(data: Mapping[str, Any]) -> list[Family]:
    """fastpool's own metric families from a ``snapshot``."""
    bounds = data["bounds"]
    found: dict[str, Family] = {}

    def add(name: str, kind: str, help_text: str, suffix: str, labels: dict[str, str],
            value: float) -> None:
        family = found.setdefault(name, Family(name, kind, help_text, []))
        family.samples.append((suffix, labels, value))

    for group, numbers in data["groups"].items():
        by = {"group": group}
        for key, value in numbers["responses"].items():
            status, served = key.split(" ")
            add("fastpool_requests", "counter",
                "Responses, by status class and by who answered (app, static, health, shed, "
                "error).", "_total", {**by, "status": status, "served_by": served}, value)
        cumulative = 0
        for bound, count in zip([*bounds, float("inf")], numbers["durations"], strict=True):
            cumulative += count
            add("fastpool_request_duration_seconds", "histogram",
                "Time from a request's first byte to its response's end.", "_bucket",
                {**by, "le": _number(bound)}, cumulative)
        add("fastpool_request_duration_seconds", "histogram", "", "_count", by, cumulative)
        add("fastpool_request_duration_seconds", "histogram", "", "_sum", by,
            numbers["duration_sum"])
        add("fastpool_requests_in_flight", "gauge", "App calls running now.", "", by,
            numbers["in_flight"])
        add("fastpool_connections_open", "gauge", "Client connections open now.", "", by,
            numbers["connections"])
        for state, count in numbers["workers"].items():
            add("fastpool_workers", "gauge", "Worker processes, by state.", "",
                {**by, "state": state}, count)
        for cause, count in numbers["restarts"].items():
            add("fastpool_worker_restarts", "counter", "Workers replaced, by cause.", "_total",
                {**by, "cause": cause}, count)
        for direction in ("in", "out"):
            add("fastpool_handoffs", "counter",
                "Connections handed between groups (routes), by direction.", "_total",
                {**by, "direction": direction}, numbers[f"handed_{direction}"])
        add("fastpool_shed", "counter",
            "Requests answered 503 by admission control (max_pending, max_queue_wait).",
            "_total", by, numbers["shed"])
        add("fastpool_handoffs_pending", "gauge",
            "Connections handed to this group that no worker has taken yet.", "", by,
            numbers["pending"])
        for entry in numbers["listen"]:
            labels = {**by, "listener": entry["listener"]}
            add("fastpool_listen_queue", "gauge",
                "Connections waiting in the kernel's accept queue now.", "", labels,
                entry["queue"])
            add("fastpool_listen_backlog", "gauge", "The accept queue's limit.", "", labels,
                entry["backlog"])
        for slot, values in numbers["slots"].items():
            labels = {**by, "slot": slot}
            add("fastpool_worker_resident_memory_bytes", "gauge",
                "Resident memory of the worker(s) in a slot.", "", labels, values["rss_bytes"])
            add("fastpool_worker_cpu_seconds", "counter",
                "User and system CPU time of the workers of a slot, past and present.",
                "_total", labels, values["cpu_seconds"])
    for process, numbers in data["processes"].items():
        by = {"process": process}
        add("fastpool_process_restarts", "counter",
            "Supervised processes ([process.NAME]) restarted.", "_total", by,
            numbers["restarts"])
        add("fastpool_processes", "gauge", "Supervised processes running.", "", by,
            numbers["running"])
    return list(found.values())


def _number(value: float) -> str:
    """A sample value or bucket bound as Prometheus writes it (1.0, 0.0005, +Inf)."""
    return "+Inf" if value == float("inf") else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(found: Iterable[Family], openmetrics: bool) -> str:
    """The families in the Prometheus text format, or OpenMetrics (counters
    are then named without ``_total`` in their metadata, and no ``# EOF``:
    the caller ends the whole exposition)."""
    lines = []
    for family in found:
        name = family.name if openmetrics or family.type != "counter" else \
            f"{family.name}_total"
        lines.append(f"# HELP {name} {_escape(family.help)}")
        lines.append(f"# TYPE {name} {family.type}")
        for suffix, labels, value in family.samples:
            text = ",".join(f'{key}="{_escape(str(item))}"' for key, item in labels.items())
            lines.append(f"{family.name}{suffix}{{{text}}} {_number(float(value))}")
    return "\n".join(lines) + ("\n" if lines else "")


def exposition(master: Master, openmetrics: bool) -> str:
    """The whole answer to a scrape: fastpool's metrics, then the app's."""
    text = render(families(snapshot(master)), openmetrics)
    if master.app_metrics is not None:
        text += master.app_metrics.exposition(openmetrics)
    return text + ("# EOF\n" if openmetrics else "")


# ---------------------------------------------------------------- the app's prometheus_client

FOLDED = "fastpool-folded"     # the pid part of the files dead workers are folded into
# The file kinds prometheus_client writes that carry values of exited
# processes: "counter", "histogram", "summary", and gauges whose mode
# aggregates across processes.
FOLDED_KINDS = ("counter", "histogram", "summary", "gauge_sum", "gauge_max", "gauge_min",
                "gauge_mostrecent")
DB_NAME = re.compile(r"(?P<kind>[a-z]+(?:_[a-z]+)?)_(?P<pid>\d+)\.db\Z")


class AppMetrics:
    """The multiprocess directory of the app's ``prometheus_client`` metrics."""

    def __init__(self, path: str, own: bool) -> None:
        self.path = path
        self.own = own            # created by fastpool (removed at exit)

    @classmethod
    def setup(cls, environ: os._Environ[str] | dict[str, str]) -> AppMetrics:
        """Use the operator's PROMETHEUS_MULTIPROC_DIR, or create one and set it
        (for the master and every child, before any app is imported)."""
        given = environ.get("PROMETHEUS_MULTIPROC_DIR")
        if given:
            os.makedirs(given, exist_ok=True)
            return cls(given, False)
        path = tempfile.mkdtemp(prefix="fastpool-prometheus-")
        environ["PROMETHEUS_MULTIPROC_DIR"] = path
        return cls(path, True)

    def worker_gone(self, pid: int) -> None:
        """A worker exited: drop its live gauges, fold the rest of its files."""
        try:
            from prometheus_client import multiprocess
            from prometheus_client.mmap_dict import MmapedDict, mmap_key
        except ImportError:
            return
        try:
            multiprocess.mark_process_dead(pid, self.path)
            for name in os.listdir(self.path):
                match = DB_NAME.match(name)
                if match is None or int(match["pid"]) != pid:
                    continue
                kind = match["kind"]
                dead = os.path.join(self.path, name)
                if kind in FOLDED_KINDS:
                    self._fold(kind, dead, multiprocess, MmapedDict, mmap_key)
                os.unlink(dead)      # (a gauge_all: one process's value, gone with it)
        except (OSError, ValueError) as exc:
            log.warning("metrics: cannot fold the prometheus_client files of pid %d in %s: %s",
                        pid, self.path, exc)

    def _fold(self, kind: str, dead: str, multiprocess: Any, mmaped_dict: Any,
              mmap_key: Any) -> None:
        folded = os.path.join(self.path, f"{kind}_{FOLDED}.db")
        files = [dead] + ([folded] if os.path.exists(folded) else [])
        merged = multiprocess.MultiProcessCollector.merge(files, accumulate=False)
        partial = folded + ".partial"
        target = mmaped_dict(partial)
        try:
            for metric in merged:
                for sample in metric.samples:
                    labels = {key: value for key, value in sample.labels.items() if key != "pid"}
                    key = mmap_key(metric.name, sample.name, list(labels), list(labels.values()),
                                   metric.documentation)
                    target.write_value(key, sample.value, sample.timestamp or 0.0)
        finally:
            target.close()
        os.replace(partial, folded)

    def exposition(self, openmetrics: bool) -> str:
        try:
            from prometheus_client import CollectorRegistry, multiprocess
            if openmetrics:
                from prometheus_client.openmetrics.exposition import generate_latest
            else:
                from prometheus_client import generate_latest
        except ImportError:
            return ""
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.path)
        text = generate_latest(registry).decode("utf-8")
        if openmetrics and text.endswith("# EOF\n"):
            text = text[:-len("# EOF\n")]
        return text

    def close(self) -> None:
        if self.own:
            shutil.rmtree(self.path, ignore_errors=True)


# ---------------------------------------------------------------- the server

@dataclasses.dataclass
class Scrape:
    """One scraper's connection: its request so far, then the answer going out."""

    sock: socket.socket
    opened: float
    received: bytearray = dataclasses.field(default_factory=bytearray)
    answer: memoryview | None = None


class MetricsServer:
    """``GET /metrics`` on ``metrics_listen``, served from the master's loop
    without ever blocking it (every socket non-blocking; a slow scraper is
    closed after SCRAPE_TIMEOUT)."""

    def __init__(self, master: Master, address: str) -> None:
        self.master = master
        self.address = address
        self.sock: socket.socket | None = None
        self.scrapes: dict[int, Scrape] = {}

    def open(self) -> None:
        from fastpool.settings import ConfigError
        from fastpool.sockets import parse_address

        address = parse_address(self.address, "metrics_listen")
        if address.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = address.path
            try:
                os.unlink(address.path)
            except OSError:
                pass
        elif address.kind == "tcp":
            sock = socket.socket(address.family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            target = (address.host, address.port)
        else:
            raise ConfigError(f"metrics_listen: {self.address!r}: expected HOST:PORT or "
                              "unix:PATH")
        try:
            sock.bind(target)
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"metrics_listen: cannot listen on {self.address}: "
                              f"{exc.strerror or exc}") from None
        sock.set_inheritable(False)
        sock.setblocking(False)
        self.sock = sock

    def describe(self) -> str:
        assert self.sock is not None
        name = self.sock.getsockname()
        if isinstance(name, tuple):
            host = f"[{name[0]}]" if ":" in name[0] else name[0]
            return f"http://{host}:{name[1]}{METRICS_PATH}"
        return f"unix:{name}"

    def readable(self) -> list[socket.socket]:
        socks = [s.sock for s in self.scrapes.values() if s.answer is None]
        if self.sock is not None and len(self.scrapes) < MAX_SCRAPERS:
            socks.append(self.sock)
        return socks

    def writable(self) -> list[socket.socket]:
        return [s.sock for s in self.scrapes.values() if s.answer is not None]

    def serve(self, readable: Iterable[object], writable: Iterable[object]) -> None:
        now = time.monotonic()
        ready = set(map(id, readable))
        if self.sock is not None and id(self.sock) in ready:
            self._accept(now)
        for scrape in list(self.scrapes.values()):
            if id(scrape.sock) in ready and scrape.answer is None:
                self._read(scrape)
        out = set(map(id, writable))
        for scrape in list(self.scrapes.values()):
            if scrape.answer is not None and id(scrape.sock) in out:
                self._write(scrape)
        for scrape in list(self.scrapes.values()):
            if now - scrape.opened > SCRAPE_TIMEOUT:
                self._close(scrape)

    def _accept(self, now: float) -> None:
        assert self.sock is not None
        while len(self.scrapes) < MAX_SCRAPERS:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                log.warning("metrics: accept failed: %s", exc.strerror or exc)
                return
            conn.setblocking(False)
            self.scrapes[conn.fileno()] = Scrape(conn, now)

    def _read(self, scrape: Scrape) -> None:
        try:
            data = scrape.sock.recv(REQUEST_LIMIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(scrape)
            return
        scrape.received += data
        end = scrape.received.find(b"\r\n\r\n")
        if end < 0:
            if len(scrape.received) > REQUEST_LIMIT:
                self._answer(scrape, 431, "text/plain", b"request header too large\n")
            return
        self._respond(scrape, bytes(scrape.received[:end]))

    def _respond(self, scrape: Scrape, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._answer(scrape, 400, "text/plain", b"bad request\n")
            return
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != METRICS_PATH.encode():
            self._answer(scrape, 404, "text/plain",
                         f"not found: the metrics are at {METRICS_PATH}\n".encode())
            return
        if method not in (b"GET", b"HEAD"):
            self._answer(scrape, 405, "text/plain", b"method not allowed\n",
                         b"Allow: GET, HEAD\r\n")
            return
        accept = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"accept":
                accept = value.lower()
        openmetrics = b"application/openmetrics-text" in accept
        try:
            body = exposition(self.master, openmetrics).encode("utf-8")
        except Exception:
            log.exception("metrics: the exposition failed")
            self._answer(scrape, 500, "text/plain", b"the exposition failed; see the log\n")
            return
        self._answer(scrape, 200, OPENMETRICS_TEXT if openmetrics else PROMETHEUS_TEXT,
                     b"" if method == b"HEAD" else body, length=len(body))

    def _answer(self, scrape: Scrape, status: int, content_type: str, body: bytes,
                extra: bytes = b"", length: int | None = None) -> None:
        from http import HTTPStatus

        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body) if length is None else length}\r\n"
                "Connection: close\r\n").encode() + extra + b"\r\n"
        scrape.answer = memoryview(head + body)
        self._write(scrape)

    def _write(self, scrape: Scrape) -> None:
        assert scrape.answer is not None
        try:
            sent = scrape.sock.send(scrape.answer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(scrape)
            return
        scrape.answer = scrape.answer[sent:]
        if not scrape.answer:
            self._close(scrape)

    def _close(self, scrape: Scrape) -> None:
        self.scrapes.pop(scrape.sock.fileno(), None)
        try:
            scrape.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        scrape.sock.close()

    def close_in_child(self) -> None:
        """A forked child's copies of the sockets (the file of a unix one stays)."""
        for scrape in self.scrapes.values():
            scrape.sock.close()
        if self.sock is not None:
            self.sock.close()

    def close(self) -> None:
        for scrape in list(self.scrapes.values()):
            self._close(scrape)
        if self.sock is not None:
            name = self.sock.getsockname()
            self.sock.close()
            self.sock = None
            if isinstance(name, str) and name:
                try:
                    os.unlink(name)
                except OSError:
                    pass
