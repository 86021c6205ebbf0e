"""The domain app: clinicians' recordings."""

from django.apps import AppConfig


class RecordingsConfig(AppConfig):
    name = "recordings"
