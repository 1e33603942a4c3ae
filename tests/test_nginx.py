"""``fastpool nginx-config`` through real nginx (issue 5, scale-out).

The generated config is included in a minimal nginx.conf, nginx (the Debian
package that README's test command installs) runs in the foreground on a free
port in front of a routed fastpool server, and requests through nginx must
land in the group their path belongs to, with the proxy headers believed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from client import Client
from clusters import fastpool, group, new_clusters, ports, render, routed_group, served
from conftest import free_port, wait_for

HELLO = b"hello from public/\n"


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(path).exists()),
        None)
    if found is None:
        pytest.fail("nginx is not installed: README's test command (.ci/run) installs it "
                    "(apt-get install nginx)")
    return found


@pytest.fixture(scope="module")
def behind_nginx(tmp_path_factory):
    binary = nginx_binary()
    factory, directory = new_clusters(tmp_path_factory, "nginx")
    chosen = ports("web")
    (directory / "public/docs").mkdir(parents=True)
    (directory / "public/hello.txt").write_bytes(HELLO)
    (directory / "public/docs/index.html").write_bytes(b"<h1>docs</h1>\n")
    (directory / "public/.env").write_bytes(b"SECRET=1\n")
    text = render(
        server={"control_socket": str(directory / ".fastpool.sock")},
        groups={"web": group(chosen["web"], 1, app="apps_routes:web",
                             static={"/": "public", "/api/docs": "public/docs"}),
                "task": routed_group("apps_routes:task", ["/tast"], 1),
                "api": routed_group("apps_routes:api", ["/api"], 1)})
    server = factory.start(text, workers=3, ports=chosen)
    nginx_port = free_port()
    generated = fastpool("nginx-config", "--config", str(directory / "fastpool.toml"),
                         "--listen", f"127.0.0.1:{nginx_port}", cwd=directory)
    assert generated.returncode == 0, generated.stderr
    (directory / "fastpool-nginx.conf").write_text(generated.stdout)
    temp = directory / "nginx-temp"
    temp.mkdir()
    # As root, nginx's workers would switch to "nobody", who cannot write here.
    user = "user root;" if os.geteuid() == 0 else ""
    (directory / "nginx.conf").write_text(f"""
{user}
worker_processes 1;
error_log {directory}/nginx-error.log;
pid {directory}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {directory}/fastpool-nginx.conf;
}}
""")
    proc = subprocess.Popen([binary, "-p", str(directory), "-c", str(directory / "nginx.conf"),
                             "-g", "daemon off;"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        def nginx_up():
            if proc.poll() is not None:
                raise AssertionError(f"nginx exited: {proc.stdout.read().decode()}")
            try:
                return Client.once(nginx_port, "/").status == 200
            except OSError:
                return False
        wait_for(nginx_up, timeout=20, what="nginx to answer")
        server.nginx = nginx_port
        server.directory = directory
        server.generated = generated.stdout
        yield server
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        factory.close()


def test_the_config_has_an_upstream_per_group_and_a_location_pair_per_route(behind_nginx):
    text = behind_nginx.generated
    for name in ("web", "task", "api"):
        assert f"upstream fastpool_{name} {{" in text
    assert "location = /tast {" in text and "location ^~ /tast/ {" in text
    assert "location = /api {" in text and "location ^~ /api/ {" in text
    assert "keepalive 32;" in text and "proxy_set_header X-Forwarded-For" in text


@pytest.mark.parametrize(("target", "expected"), [
    ("/", "web"), ("/tast", "task"), ("/tast/x", "task"), ("/tasty", "web"),
    ("/%74ast/x", "task"), ("/api/q?x=1", "api"), ("/apix", "web"),
])
def test_requests_through_nginx_reach_their_group(behind_nginx, target, expected):
    response = Client.once(behind_nginx.nginx, target)
    assert response.status == 200, response
    assert served(response)["group"] == expected


def test_a_post_body_through_nginx_reaches_the_routed_group(behind_nginx):
    body = bytes(range(256)) * 600
    response = Client.once(behind_nginx.nginx, "/tast/upload", "POST", body)
    info = served(response)
    assert info["group"] == "task" and info["length"] == len(body)


# ---------------------------------------------------------------- static mounts (issue 13)

def test_a_static_file_is_served_by_nginx_itself(behind_nginx):
    response = Client.once(behind_nginx.nginx, "/hello.txt")
    assert (response.status, response.body) == (200, HELLO)
    assert response.header("server").startswith("nginx")
    assert Client.once(behind_nginx.nginx, "/docs/").body == b"<h1>docs</h1>\n"


@pytest.mark.parametrize(("method", "target"), [
    ("GET", "/missing.txt"), ("POST", "/hello.txt"), ("GET", "/.env"), ("GET", "/"),
])
def test_what_is_not_a_file_reaches_the_group_through_nginx(behind_nginx, method, target):
    response = Client.once(behind_nginx.nginx, target, method, b"x" if method == "POST" else b"")
    assert response.status == 200, response
    assert served(response)["group"] == "web"


def test_a_directory_without_its_slash_is_redirected_as_fastpool_does(behind_nginx):
    response = Client.once(behind_nginx.nginx, "/docs")
    assert response.status == 301
    assert response.header("location").endswith("/docs/")


def test_a_mount_under_another_groups_route_is_left_out(behind_nginx):
    assert "# static /api/docs of group web: under a route of group api" in \
        behind_nginx.generated
    assert served(Client.once(behind_nginx.nginx, "/api/docs/index.html"))["group"] == "api"
