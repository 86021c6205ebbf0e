"""Every recording carries its digest (recordings.digests); rows made before get theirs here."""

from django.db import migrations, models

from clinical import sql
from recordings.digests import stored

UPDATE = "UPDATE recordings_recording SET digest = %s WHERE id = %s"


def digest_existing(apps, schema_editor):
    db = schema_editor.connection
    for batch in stored(db):
        sql.executemany(db, UPDATE, [[computed, rid] for rid, _, computed in batch])


class Migration(migrations.Migration):
    dependencies = [
        ("recordings", "0004_tombstones_hold_no_content"),
    ]

    operations = [
        migrations.AddField(
            model_name="recording",
            name="digest",
            field=models.CharField(default="", editable=False, max_length=64),
        ),
        migrations.RunPython(digest_existing, migrations.RunPython.noop),
    ]
