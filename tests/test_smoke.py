"""The bundled example and the basics of ``fastpool serve``."""

import http.client
import json
import subprocess
import sys


def test_version_reports_compiled_core():
    out = subprocess.run([sys.executable, "-m", "fastpool", "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("fastpool ")
    assert "compiled core: yes (" in out
    assert "_wsgi" in out


def test_bundled_example_serves_hello(serve):
    server = serve("fastpool.examples.hello:app")
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", "/")
    response = conn.getresponse()
    assert response.status == 200
    assert response.read() == b"Hello, World!\n"
    assert response.getheader("Server") == "fastpool"
    assert response.getheader("Content-Length") == "14"
    assert response.getheader("Date", "").endswith(" GMT")
    conn.request("POST", "/echo", body=b"ping")
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"ping")


def test_environ_basics(serve):
    server = serve("apps:environ")
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", "/a%20b/c?x=1&y=%20", headers={"X-Thing": "v"})
    response = conn.getresponse()
    assert response.status == 200
    env = json.loads(response.read())
    assert env["PATH_INFO"] == "/a b/c"
    assert env["QUERY_STRING"] == "x=1&y=%20"
    assert env["RAW_URI"] == "/a%20b/c?x=1&y=%20"
    assert env["REQUEST_METHOD"] == "GET"
    assert env["HTTP_X_THING"] == "v"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["SERVER_PORT"] == str(server.port)
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["wsgi.multiprocess"] is True
    assert env["wsgi.multithread"] is False
