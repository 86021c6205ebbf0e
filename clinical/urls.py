"""URLs: the API under /api/, the staff admin under /admin/."""

from django.contrib import admin
from django.urls import path

from clinical.api import api

urlpatterns = [
    path("api/", api.urls),
    path("admin/", admin.site.urls),
]
