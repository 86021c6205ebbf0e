"""Deleted recordings keep no clinical content, and the admin's own log names recordings by id only."""

from django.db import migrations

CLEARED = {
    "patient_ref": "",
    "title": "",
    "note_type": "",
    "audio_path": "",
    "duration_seconds": None,
    "transcript": "",
    "verification_results": {},
    "error": "",
    "recorded_at": None,
}


def clear_tombstones(apps, schema_editor):
    Recording = apps.get_model("recordings", "Recording")
    Recording.objects.using(schema_editor.connection.alias).filter(deleted_at__isnull=False).update(**CLEARED)


def admin_log_without_patient_text(apps, schema_editor):
    alias = schema_editor.connection.alias
    LogEntry = apps.get_model("admin", "LogEntry")
    ContentType = apps.get_model("contenttypes", "ContentType")
    kind = ContentType.objects.using(alias).filter(app_label="recordings", model="recording").first()
    if kind is None:
        return
    entries = LogEntry.objects.using(alias).filter(content_type=kind)
    for entry in entries.only("object_id").iterator():
        entries.filter(pk=entry.pk).update(object_repr=f"Recording {entry.object_id}")


class Migration(migrations.Migration):
    dependencies = [
        ("recordings", "0003_verification_results_validated"),
        ("admin", "0003_logentry_add_action_flag_choices"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [
        migrations.RunPython(clear_tombstones, migrations.RunPython.noop),
        migrations.RunPython(admin_log_without_patient_text, migrations.RunPython.noop),
    ]
