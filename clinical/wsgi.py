"""WSGI entry point, for tools that want one; the server runs clinical.asgi."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "clinical.settings")

application = get_wsgi_application()
