"""replicate: stream every change of the SQLite database to CLINICAL_REPLICA_URL with Litestream, in the foreground.

Litestream runs with a configuration made from the settings (clinical.replication)
until SIGTERM or SIGINT (Ctrl-C), which it gets too: it ships what it has,
then stops. scripts/serve runs this beside the server when the URL is set;
deploy/clinical-replicate.service runs it as a unit of its own. On PostgreSQL
it refuses: replication is PostgreSQL's own there.
"""

from django.core.management.base import BaseCommand, CommandError

from clinical.replication import ReplicaError, database_replication, litestream_version, notify_systemd


class Command(BaseCommand):
    help = "Stream every change of the SQLite database to CLINICAL_REPLICA_URL with Litestream, until stopped."

    def handle(self, *args, verbosity: int, **options):
        try:
            replication = database_replication()
            version = litestream_version()
        except ReplicaError as exc:
            raise CommandError(str(exc)) from exc
        if verbosity >= 1:
            self.stdout.write(f"SQLite database {replication.path}")
            self.stdout.write(f"Replicating to {replication.replica} with Litestream {version}.")

        def ready(pid: int) -> None:
            notify_systemd("READY=1")  # deploy/clinical-replicate.service: the server starts after this
            if verbosity >= 1:
                self.stdout.write(f"Litestream (pid {pid}) is replicating.")
            self.stdout.flush()

        try:
            code, stopped = replication.run(ready=ready)
        except ReplicaError as exc:
            raise CommandError(str(exc)) from exc
        if code != 0:
            when = "while it shut down: the replica may lack the last changes" if stopped else "by itself"
            raise CommandError(f"Litestream stopped with exit code {code} {when}; its log above says why.")
        if verbosity >= 1:
            self.stdout.write(self.style.SUCCESS("Replication stopped."))
