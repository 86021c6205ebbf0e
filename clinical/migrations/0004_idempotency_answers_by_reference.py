"""Stored answers that carry a recording keep its id, not its content; those of deleted recordings go."""

import json
import uuid

from django.db import migrations


def answers_by_reference(apps, schema_editor):
    IdempotencyKey = apps.get_model("clinical", "IdempotencyKey")
    Recording = apps.get_model("recordings", "Recording")
    for stored in IdempotencyKey.objects.exclude(body=b"").iterator():
        try:
            recording_id = uuid.UUID(json.loads(bytes(stored.body))["id"])
        except (ValueError, KeyError, TypeError):
            continue
        IdempotencyKey.objects.filter(pk=stored.pk).update(recording_id=recording_id, body=b"")
    deleted = Recording.objects.filter(deleted_at__isnull=False).values("id")
    IdempotencyKey.objects.filter(recording_id__in=deleted).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("clinical", "0003_security_hardening"),
        ("recordings", "0003_verification_results_validated"),
    ]

    operations = [migrations.RunPython(answers_by_reference, migrations.RunPython.noop)]
