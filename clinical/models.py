"""The platform's tables: API tokens and the one change sequence."""

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
    body = models.BinaryField()
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "key"], name="idempotency_user_key")]

    def __str__(self) -> str:
        return f"idempotency key of {self.user_id}: {self.key}"


FAILED_LOGINS = models.Q(action="login_failed")


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

    at = models.DateTimeField(db_index=True)
    # No database constraint: the event outlives the user, and keeps the username.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.DO_NOTHING, db_constraint=False, null=True, related_name="+"
    )
    username = models.CharField(max_length=150)
    action = models.CharField(max_length=20, choices=Action)
    recording_id = models.UUIDField(null=True, blank=True, db_index=True)
    fields = models.JSONField(default=list, blank=True)
    status_from = models.CharField(max_length=20, blank=True, default="")
    status_to = models.CharField(max_length=20, blank=True, default="")
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    outcome = models.CharField(max_length=20, default="success")

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [
            # The login throttle counts recent failures by username and by address;
            # partial, so that the many read events do not pay for them.
            models.Index(fields=["username", "at"], name="audit_failed_user_at", condition=FAILED_LOGINS),
            models.Index(fields=["client_ip", "at"], name="audit_failed_ip_at", condition=FAILED_LOGINS),
        ]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.username} {self.action}"
