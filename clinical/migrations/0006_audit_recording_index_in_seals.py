"""A recording's audit events are found through their seals' index, not an index on the events.

An index on the events' recording_id makes every group commit of reads write
one index page per recording it read: for a page of the list, 50 pages. The
seals are written once a second, so their index is written once a page per
second (README, "Performance across cores").
"""

from django.db import migrations, models

from clinical.audit import SEAL_TABLE, TABLE, create_seal_triggers, drop_seal_triggers

EVENTS_INDEX = "clinical_auditevent_recording_id_c201c778"  # Django's name for it on both engines


def fill_seal_recording_ids(apps, schema_editor):
    # The seals refuse UPDATE: let them take this one, then refuse again.
    drop_seal_triggers(apps, schema_editor)
    schema_editor.execute(
        f"UPDATE {SEAL_TABLE} SET recording_id = "
        f"(SELECT recording_id FROM {TABLE} WHERE {TABLE}.id = {SEAL_TABLE}.event_id)"
    )
    create_seal_triggers(apps, schema_editor)


class Migration(migrations.Migration):
    dependencies = [
        ("clinical", "0005_audit_chain"),
    ]

    operations = [
        migrations.AddField(
            model_name="auditseal",
            name="recording_id",
            field=models.UUIDField(blank=True, db_index=True, null=True),
        ),
        migrations.RunPython(fill_seal_recording_ids, migrations.RunPython.noop),
        # Dropped in place: Django would rebuild the events' table on SQLite, its triggers with it.
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="auditevent",
                    name="recording_id",
                    field=models.UUIDField(blank=True, null=True),
                ),
            ],
            database_operations=[
                migrations.RunSQL(
                    f"DROP INDEX IF EXISTS {EVENTS_INDEX}",
                    f"CREATE INDEX {EVENTS_INDEX} ON {TABLE} (recording_id)",
                ),
            ],
        ),
    ]
