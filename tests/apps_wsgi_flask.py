"""A small real Flask app, ``apps_wsgi_flask:app``.

It is served without wsgiref's validator: werkzeug reads form bodies with
``wsgi.input.read()`` (no size), which PEP 3333 allows and the validator does not.
"""

from __future__ import annotations

from flask import Flask, abort, jsonify, request

app = Flask(__name__)


@app.get("/")
def index():
    return "flask index"


@app.get("/items/<int:item_id>")
def item(item_id: int):
    return jsonify(id=item_id, square=item_id * item_id, args=request.args.to_dict())


@app.post("/form")
def form():
    return jsonify(name=request.form["name"], tags=request.form.getlist("tag"),
                   path=request.path, script_root=request.script_root)


@app.post("/json")
def echo_json():
    data = request.get_json()
    return jsonify(received=data, length=request.content_length), 201


@app.get("/abort")
def aborted():
    abort(500)



@app.get("/events")
def events():
    """Server-sent events from a generator that needs the request context
    (``stream_with_context``) and sleeps between events."""
    import time

    from flask import stream_with_context

    def generate():
        count = int(request.args.get("n", "5"))
        for i in range(count):
            if i:
                time.sleep(float(request.args.get("every", "0.2")))
            yield f"data: {i} {request.path}\n\n"

    return app.response_class(stream_with_context(generate()), mimetype="text/event-stream")
