"""A minimal Django project in one module: ``apps_django:application`` (WSGI)
and ``apps_django:asgi_application`` (ASGI), for the streaming tests.

``/events?n=N&every=S`` is a ``StreamingHttpResponse`` of N server-sent events,
one every S seconds (a generator for WSGI, an async generator for ASGI).
"""

from __future__ import annotations

import asyncio
import time

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="fastpool-tests-only",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
)
django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import StreamingHttpResponse  # noqa: E402
from django.urls import path  # noqa: E402


def _count(request) -> tuple[int, float]:
    return int(request.GET.get("n", "5")), float(request.GET.get("every", "0.2"))


def events(request):
    count, every = _count(request)

    def generate():
        for i in range(count):
            if i:
                time.sleep(every)
            yield f"data: {i}\n\n"

    return StreamingHttpResponse(generate(), content_type="text/event-stream")


def async_events(request):
    count, every = _count(request)

    async def generate():
        for i in range(count):
            if i:
                await asyncio.sleep(every)
            yield f"data: {i}\n\n"

    return StreamingHttpResponse(generate(), content_type="text/event-stream")


urlpatterns = [path("events", events), path("aevents", async_events)]

application = get_wsgi_application()
asgi_application = get_asgi_application()
