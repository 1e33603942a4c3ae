"""Django: ``GET /json`` (``JsonResponse``; also ``/``) and ``GET /page`` (``render`` of a
template, through the cached loader), through ``startproject``'s default middleware and
installed apps. Settings are configured here in code; there is no database (nothing
reads the session or the user, so nothing queries one).

``application`` is the WSGI callable.
"""

from __future__ import annotations

import django
from django.conf import settings

from frameworks_apps import PAGE_TEMPLATE, PAYLOAD, page_context

settings.configure(
    DEBUG=False,
    SECRET_KEY="bench-not-secret-" + "x" * 40,
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    # what `django-admin startproject` writes, in its order
    INSTALLED_APPS=[
        "django.contrib.admin",
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "django.contrib.sessions",
        "django.contrib.messages",
        "django.contrib.staticfiles",
    ],
    MIDDLEWARE=[
        "django.middleware.security.SecurityMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
        "django.middleware.clickjacking.XFrameOptionsMiddleware",
    ],
    TEMPLATES=[{
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
            # the cached loader (Django's default when DEBUG is off) over the template
            "loaders": [("django.template.loaders.cached.Loader", [
                ("django.template.loaders.locmem.Loader", {"page.html": PAGE_TEMPLATE}),
            ])],
        },
    }],
    DATABASES={},
    USE_TZ=True,
    STATIC_URL="static/",
)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402  (after setup)
from django.http import HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.shortcuts import render  # noqa: E402
from django.urls import path  # noqa: E402


def json_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse(PAYLOAD)


def page_view(request: HttpRequest) -> HttpResponse:
    return render(request, "page.html", page_context())


urlpatterns = [path("", json_view), path("json", json_view), path("page", page_view)]

application = get_wsgi_application()
