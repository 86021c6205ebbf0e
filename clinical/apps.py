"""The platform app: what the whole system shares."""

from django.apps import AppConfig


class ClinicalConfig(AppConfig):
    name = "clinical"
    verbose_name = "Clinical platform"

    def ready(self) -> None:
        from clinical import checks, sqlite  # noqa: F401  (registers the checks, connects the pragma receiver)
        from clinical.files import make_private, private_paths

        make_private(private_paths())
