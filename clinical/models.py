"""The platform's tables: API tokens, the change sequence, idempotency keys, login attempts, the audit trail."""

from django.conf import settings
from django.db import models


class Token(models.Model):
    """A bearer token; only the SHA-256 of its secret is stored."""

    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    created_at = models.DateTimeField(editable=False)
    expires_at = models.DateTimeField(db_index=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    # Binds the token to the password it was issued under: a password change,
    # by any path, refuses it (clinical.tokens.password_stamp).
    password_stamp = models.CharField(max_length=64, default="", editable=False)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"token {self.pk} of {self.user_id}"


class ChangeSequence(models.Model):
    """The counter behind the sync cursor: a single row, bumped inside each write."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    value = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"change sequence at {self.value}"


class IdempotencyKey(models.Model):
    """The stored answer to a mutating request sent with an Idempotency-Key header."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64)
    status_code = models.PositiveSmallIntegerField()
    body = models.BinaryField(blank=True, default=b"")
    # The recording the answer carries: its stored answers go when it is deleted,
    # and past a user's size budget only this is kept (clinical.idempotency).
    recording_id = models.UUIDField(null=True, blank=True, db_index=True)
    size = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "key"], name="idempotency_user_key")]
        # A user's stored bytes are summed on every keyed write (the size budget).
        indexes = [models.Index(fields=["user", "created_at", "size"], name="idempotency_user_size")]

    def __str__(self) -> str:
        return f"idempotency key of {self.user_id}: {self.key}"


class LoginAttempt(models.Model):
    """A login attempt, counted by the throttle from the moment it starts (clinical.throttle)."""

    class Outcome(models.TextChoices):
        PENDING = "pending"  # counts as a failure until it ends
        FAILED = "failed"
        SUCCESS = "success"

    username = models.CharField(max_length=150)
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    started_at = models.DateTimeField()
    outcome = models.CharField(max_length=10, choices=Outcome, default=Outcome.PENDING)

    class Meta:
        indexes = [
            models.Index(fields=["username", "started_at"], name="attempt_user_started"),
            models.Index(fields=["client_ip", "started_at"], name="attempt_ip_started"),
        ]

    def __str__(self) -> str:
        return f"login attempt for {self.username} at {self.started_at:%Y-%m-%d %H:%M:%S}: {self.outcome}"


class AuditEvent(models.Model):
    """Who read or changed which recording, and who logged in: append-only."""

    class Action(models.TextChoices):
        CREATE = "create"
        UPDATE = "update"
        DELETE = "delete"
        READ = "read"
        LOGIN = "login"
        LOGIN_FAILED = "login_failed"
        TOKEN_REVOKED = "token_revoked"  # noqa: S105 (an action name)
        RESTORE = "restore"

    at = models.DateTimeField(db_index=True)
    # No database constraint: the event outlives the user, and keeps the username.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.DO_NOTHING, db_constraint=False, null=True, related_name="+"
    )
    username = models.CharField(max_length=150)
    action = models.CharField(max_length=20, choices=Action)
    # Not indexed here: a recording's events are found through their seals (AuditSeal).
    recording_id = models.UUIDField(null=True, blank=True)
    fields = models.JSONField(default=list, blank=True)
    status_from = models.CharField(max_length=20, blank=True, default="")
    status_to = models.CharField(max_length=20, blank=True, default="")
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    outcome = models.CharField(max_length=20, default="success")
    # What an operation acted on (a restore: from which file, what it replaced); never patient text.
    detail = models.TextField(null=True, blank=True)  # noqa: DJ001 (null: added without rebuilding a long table)

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.username} {self.action}"


class AuditSeal(models.Model):
    """An audit event's place in the hash chain (clinical.chain): append-only, like the events.

    Kept beside the events, not in them, so that the events' table stays
    insert-only; no foreign key, so that an event deleted behind the
    application's back leaves its seal, and the chain says which one went.
    """

    event_id = models.BigIntegerField(primary_key=True)
    hash = models.CharField(max_length=64)
    # The event's recording, indexed here rather than in the events' table.
    recording_id = models.UUIDField(null=True, blank=True, db_index=True)

    def __str__(self) -> str:
        return f"seal of audit event {self.event_id}"


class AuditCheck(models.Model):
    """A run of verifyaudit: when, how far, what it found (the admin shows the latest)."""

    at = models.DateTimeField()
    events = models.BigIntegerField()
    head = models.CharField(max_length=64, blank=True, default="")
    last_event_id = models.BigIntegerField(null=True, blank=True)
    ok = models.BooleanField()
    detail = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"audit chain check at {self.at:%Y-%m-%d %H:%M:%S}: {'whole' if self.ok else 'broken'}"
