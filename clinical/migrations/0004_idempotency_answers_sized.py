"""Stored answers know the recording they carry and their size; those of deleted recordings go."""

import json
import uuid

from django.db import migrations, models


def answers_know_their_recording(apps, schema_editor):
    alias = schema_editor.connection.alias
    IdempotencyKey = apps.get_model("clinical", "IdempotencyKey")
    Recording = apps.get_model("recordings", "Recording")
    keys = IdempotencyKey.objects.using(alias)
    for stored in keys.exclude(body=b"").iterator():
        body = bytes(stored.body)
        try:
            recording_id = uuid.UUID(json.loads(body)["id"])
        except (ValueError, KeyError, TypeError):
            recording_id = None
        keys.filter(pk=stored.pk).update(recording_id=recording_id, size=len(body))
    deleted = Recording.objects.using(alias).filter(deleted_at__isnull=False).values("id")
    keys.filter(recording_id__in=deleted).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("clinical", "0003_security_hardening"),
        ("recordings", "0003_verification_results_validated"),
    ]

    operations = [
        migrations.AddField(
            model_name="idempotencykey",
            name="size",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AlterField(
            model_name="idempotencykey",
            name="body",
            field=models.BinaryField(blank=True, default=b""),
        ),
        migrations.AddIndex(
            model_name="idempotencykey",
            index=models.Index(fields=["user", "created_at", "size"], name="idempotency_user_size"),
        ),
        migrations.RunPython(answers_know_their_recording, migrations.RunPython.noop),
    ]
