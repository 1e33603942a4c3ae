"""Flask: ``GET /json`` (a dict returned from the view: Flask's JSON provider) and
``GET /page`` (``render_template`` of a Jinja2 template, compiled once and cached).
``GET /`` is ``/json``."""

from __future__ import annotations

from typing import Any

from flask import Flask, render_template
from jinja2 import DictLoader

from frameworks_apps import PAGE_TEMPLATE, PAYLOAD, page_context

app = Flask(__name__)
app.jinja_loader = DictLoader({"page.html": PAGE_TEMPLATE})  # type: ignore[assignment]


@app.get("/")
@app.get("/json")
def json_view() -> dict[str, Any]:
    return PAYLOAD


@app.get("/page")
def page_view() -> str:
    return render_template("page.html", **page_context())
