"""``fastpool nginx-config``: the same layout as an nginx config, for scale-out.

Rules of this module:

* The output is an ``http``-context fragment (upstreams, a ``map`` for
  WebSocket upgrades, one ``server``) to ``include`` inside ``http { }``.
* One upstream per group.  A group with listen addresses is reached on them; a
  group with only routes has no port of its own, so its upstream points at
  the listeners of the default group — fastpool routes the request on arrival
  too, so the two layers always agree.
* One location pair per route: ``location = /tast`` and ``location ^~ /tast/``
  match whole path segments, like fastpool (a bare ``location /tast`` would
  also take ``/tasty``).  nginx normalises the path (percent-decoding, dot
  segments, merged slashes) before it matches, as fastpool does.
* Static mounts (``static``) become locations that serve the file when there
  is one and hand everything else to the group, as fastpool does: ``alias``
  (``root`` for ``/``) with ``try_files`` falling back to ``@group``; a method
  other than GET/HEAD (nginx's 405) and dotfiles go to the group too.  A path
  ending in ``/`` is looked up as its ``index.html`` (the ``map`` of
  ``$fastpool_static_file``), so a directory without one reaches the group, and
  a directory named without its slash reaches it too -- fastpool then answers
  the redirect, as it would alone.  A
  mount under a route of another group is never reached in fastpool (the
  route picks the group first), so it is left out, with a comment.
* ``--upstream-hosts h1,h2`` puts every host's copy of each port in each
  upstream (several machines run the same config); without it the listen
  addresses are used as they are, with ``0.0.0.0``/``::`` read as loopback.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastpool.settings import GroupConfig, ServerConfig, prefix_key
from fastpool.sockets import parse_address

# Set once in the server block; the locations inherit them.
PROXY_HEADERS = """\
    proxy_http_version 1.1;
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header Upgrade $http_upgrade;
    proxy_set_header Connection $fastpool_connection;"""


def _tcp_ports(listen: Sequence[str], where: str) -> list[tuple[str, int]]:
    ports = []
    for text in listen:
        address = parse_address(text, where)
        if address.kind == "tcp":
            ports.append((address.host, address.port))
    return ports


def _server_line(host: str, port: int) -> str:
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "[::1]"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"    server {host}:{port};"


def render(config: ServerConfig, upstream_hosts: list[str] | None = None,
           listen: str = "80") -> str:
    """The nginx fragment for ``config``."""
    listening = {name: _tcp_ports(group.listen, f"[group.{name}] listen")
                 for name, group in config.groups.items()}
    default = next((name for name, ports in listening.items() if ports), None)
    if default is None:
        raise ValueError("no group listens on a plain TCP address: nginx has nothing to proxy "
                         "to (nginx terminates TLS itself and proxies to listen addresses; "
                         "tls_listen is for serving without nginx)")
    source = config.path.name if config.path is not None else "the command line"
    lines = [
        f"# nginx config for the fastpool layout of {source}, made by `fastpool nginx-config`.",
        "# Include it inside http { }.",
        "",
        "map $http_upgrade $fastpool_connection {",
        "    default upgrade;",
        "    ''      '';",
        "}",
        "",
    ]
    if any(group.static for group in config.groups.values()):
        lines += [
            "map $uri $fastpool_static_file {",
            "    ~/$      ${uri}index.html;",
            "    default  $uri;",
            "}",
            "",
        ]
    for name, group in config.groups.items():
        ports = listening[name] or listening[default]
        via = "" if listening[name] else f" (no listener: via group {default}, which routes it)"
        lines.append(f"# group {name}: {group.workers} worker(s) per host{via}")
        lines.append(f"upstream fastpool_{name} {{")
        for host, port in ports:
            for target in (upstream_hosts or [host]):
                lines.append(_server_line(target, port))
        lines.append("    keepalive 32;")
        lines.append("}")
        lines.append("")
    lines += ["server {", f"    listen {listen};", PROXY_HEADERS, ""]
    routes = sorted(((prefix.rstrip("/") or "/", name)
                     for name, group in config.groups.items() for prefix in group.routes),
                    key=lambda entry: -len(entry[0]))
    for prefix, name in routes:
        if prefix == "/":
            continue
        for location in (f"= {prefix}", f"^~ {prefix}/"):
            lines.append(f"    location {location} {{")
            lines.append(f"        proxy_pass http://fastpool_{name};")
            lines.append("    }")
    root = next((name for prefix, name in routes if prefix == "/"), default)
    served: set[str] = set()
    root_directory = None
    for name, group in config.groups.items():
        for prefix, directory in group.static:
            path = prefix_key(prefix)
            owner = next((routed for route, routed in routes
                          if route != "/" and (path == route or path.startswith(route + "/"))),
                         root)
            if owner != name:
                lines.append(f"    # static {path} of group {name}: under a route of group "
                             f"{owner}, which fastpool picks first; not served")
                continue
            served.add(name)
            if path == "/":
                root_directory = directory
                continue
            lines += _static_location(f"^~ {path}/", f"alias {directory.rstrip('/')}/", name,
                                      group)
    if root_directory is not None:
        lines += _static_location("/", f"root {root_directory}", root, config.groups[root])
    else:
        lines.append("    location / {")
        lines.append(f"        proxy_pass http://fastpool_{root};")
        lines.append("    }")
    for name in sorted(served):
        lines.append(f"    location @fastpool_{name} {{")
        lines.append(f"        proxy_pass http://fastpool_{name};")
        lines.append("    }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _static_location(match: str, directory: str, name: str, group: GroupConfig) -> list[str]:
    """A static mount: the file if there is one, else the group (see the rules)."""
    lines = [f"    location {match} {{", f"        {directory};"]
    if group.static_max_age:
        lines.append(f'        add_header Cache-Control "public, max-age={group.static_max_age}";')
    if group.static_precompressed:
        lines.append("        gzip_static on;     # NAME.gz beside a file (nginx has no .br one)")
    return lines + [
        f"        try_files $fastpool_static_file @fastpool_{name};",
        f"        error_page 405 = @fastpool_{name};",
        "        location ~ /\\. {",
        f"            proxy_pass http://fastpool_{name};",
        "        }",
        "    }",
    ]
