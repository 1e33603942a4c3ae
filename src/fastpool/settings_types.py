"""The settings as typed attributes of the configs, generated from the table.

Do not edit: ``python -m fastpool.settings --write-types`` writes this file from
the rows of ``fastpool.settings.SETTINGS`` (a test checks that it is current).
Type checkers read these declarations; at run time each value comes from the
config's read-only ``values``.
"""

from __future__ import annotations


class GroupSettings:
    """Every GroupConfig setting, as an attribute."""

    app: str
    interface: str
    loop: str
    lifespan: str
    ws_max_size: int
    ws_ping_interval: float
    ws_ping_timeout: float
    ws_per_message_deflate: bool
    listen: tuple[str, ...]
    tls_listen: tuple[str, ...]
    workers: int
    threads: int
    reuse_port: bool
    backlog: int
    preload: bool
    root_path: str
    timeout: float
    graceful_timeout: float
    keep_alive: float
    client_timeout: float
    header_timeout: float    # alias of client_timeout
    max_requests: int
    max_requests_jitter: int
    max_rss: int
    limit_request_line: int
    limit_request_fields: int
    limit_request_field_size: int
    limit_request_body: int
    nice: int
    cpus: tuple[int, ...]
    crash_limit: int
    on_crash_loop: str
    routes: tuple[str, ...]
    max_pending: int
    retry_after: int
    max_queue_wait: float
    health_path: str | None
    forwarded_allow_ips: tuple[str, ...]
    proxy_protocol: bool
    access_log: str | None
    access_log_format: str
    static: tuple[tuple[str, str], ...]
    static_max_age: int
    static_precompressed: bool
    static_follow_symlinks: bool
    certfile: str | None
    keyfile: str | None
    keyfile_password: str | None
    ca_certs: str | None
    client_certs: str
    tls_ciphers: str | None
    tls_min_version: str
    ktls: bool


class ServerSettings:
    """Every ServerConfig setting, as an attribute."""

    host: str
    port: int
    chdir: str | None
    log_level: str
    error_log: str
    log_config: str | None
    control_socket: str
    metrics_listen: str | None
    reload: bool
    reload_dirs: tuple[str, ...]
    reload_includes: tuple[str, ...]
    reload_excludes: tuple[str, ...]
    reload_watcher: str
    pid_file: str | None
    env_file: str | None


class ProcessSettings:
    """Every ProcessConfig setting, as an attribute."""

    target: str | None
    command: tuple[str, ...] | None
    count: int
    env: tuple[tuple[str, str], ...]
    cwd: str | None
    stop_signal: str
    nice: int
    cpus: tuple[int, ...]
    graceful_timeout: float
    crash_limit: int
    on_crash_loop: str
