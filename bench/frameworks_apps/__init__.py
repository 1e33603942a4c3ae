"""The apps of ``bench/frameworks.py``: one small app per framework, and the bytes they answer.

Rules:

* One module per framework (``flask_app``, ``django_app``, ``fastapi_app``,
  ``starlette_app``), each importable on its own from bench/ (the servers' working
  directory); this package's ``__init__`` is standard library only, so the harness (and
  its checks) can import it without any framework installed.
* Every app serves the same data (``PAYLOAD``, ``ORDER``, ``PAGE_TEMPLATE`` and its
  context), the way a user of that framework would write it: the framework's own JSON
  response, its own template engine with the template compiled once (cached), FastAPI's
  validation of a request body into a Pydantic model and back.
* ``GET /`` answers 200 in every app (the harness waits for it before anything else).
* The expected response bodies are computed here from the same data
  (``expected_body``): each framework's serializer is deterministic (key order,
  separators, a final newline or not), so the checks compare bytes, not just parse them.
"""

from __future__ import annotations

import html
import json
from typing import Any

TITLE = "Orders & <items>"  # escaped on the page: the template engine's autoescape runs

ITEMS: list[dict[str, str]] = [
    {"name": f"item {i} <{'ab' * (i % 3)}>", "price": f"{i * 7 % 100}.{i * 13 % 100:02d}",
     "sku": f"SKU-{i:05d}"}
    for i in range(20)
]

# GET /json in Flask, Django and Starlette: a 1 KiB-ish object, nested like an API answer.
PAYLOAD: dict[str, Any] = {
    "id": 12345,
    "status": "ok",
    "user": {"name": "Ada", "email": "ada@example.com", "roles": ["admin", "dev"]},
    "items": [{"sku": item["sku"], "qty": n + 1, "price": float(item["price"])}
              for n, item in enumerate(ITEMS[:10])],
    "total": 1234.5,
    "paid": True,
    "note": None,
}

# POST /orders in FastAPI: validated into the ``Order`` model and returned. Keys in the
# models' field order, every field given, so the answer is these bytes again.
ORDER: dict[str, Any] = {
    "id": 42,
    "customer": "Ada Lovelace",
    "email": "ada@example.com",
    "items": [{"sku": item["sku"], "name": item["name"], "quantity": n + 1,
               "price": float(item["price"]), "tags": ["a", "b"][: n % 3]}
              for n, item in enumerate(ITEMS[:8])],
    "express": False,
    "note": "leave at the door",
}
ORDER_BODY: bytes = json.dumps(ORDER, separators=(",", ":")).encode()

# The page: the same source for Jinja2 (Flask) and Django templates (both read this
# subset the same way); no trailing newline (Jinja2 would drop it, Django keeps it).
PAGE_TEMPLATE = (
    "<!doctype html>\n"
    "<html><head><title>{{ title }}</title></head>\n"
    "<body><h1>{{ title }}</h1>\n"
    "<table>\n"
    "{% for item in items %}"
    "<tr><td>{{ item.sku }}</td><td>{{ item.name }}</td><td>{{ item.price }}</td></tr>\n"
    "{% endfor %}</table>\n"
    "<p>{{ count }} items</p>\n"
    "</body></html>"
)


def page_context() -> dict[str, Any]:
    return {"title": TITLE, "items": ITEMS, "count": len(ITEMS)}


def _page() -> bytes:
    """The page as both engines render it (autoescape of & < >: the data has no quotes)."""
    rows = "".join(f"<tr><td>{html.escape(i['sku'])}</td><td>{html.escape(i['name'])}</td>"
                   f"<td>{html.escape(i['price'])}</td></tr>\n" for i in ITEMS)
    title = html.escape(TITLE)
    return (f"<!doctype html>\n<html><head><title>{title}</title></head>\n"
            f"<body><h1>{title}</h1>\n<table>\n{rows}</table>\n"
            f"<p>{len(ITEMS)} items</p>\n</body></html>").encode()


PAGE: bytes = _page()

# framework -> path -> the exact body of a 200 answer
EXPECTED: dict[str, dict[str, bytes]] = {
    # Flask's JSON provider: sorted keys, compact, a final newline
    "flask": {"/json": json.dumps(PAYLOAD, sort_keys=True, separators=(",", ":")).encode()
              + b"\n", "/page": PAGE},
    # Django's JsonResponse: json.dumps's default separators, key order kept
    "django": {"/json": json.dumps(PAYLOAD).encode(), "/page": PAGE},
    # Starlette's JSONResponse (FastAPI's too): compact, key order kept
    "fastapi": {"/orders": ORDER_BODY},
    "starlette": {"/json": json.dumps(PAYLOAD, separators=(",", ":")).encode()},
}


def expected_body(framework: str, path: str) -> bytes:
    return EXPECTED[framework][path]
