"""The platform app: what the whole system shares."""

from django.apps import AppConfig


class ClinicalConfig(AppConfig):
    name = "clinical"
    verbose_name = "Clinical platform"

    def ready(self) -> None:
        from clinical import sqlite  # noqa: F401  (connects the pragma receiver)
