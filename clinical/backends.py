"""The admin's login, throttled and audited like the API's, under the same rule."""

from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import PermissionDenied
from django.db import transaction

from clinical.audit import Action, audit_record
from clinical.passwords import in_turn, password_matches
from clinical.requests import client_ip
from clinical.throttle import login_attempt_end, login_attempt_start, login_failure_record

NOT_STAFF = "not_staff"


class ThrottledModelBackend(ModelBackend):
    def authenticate(self, request, username=None, password=None, **kwargs):
        if username is None or password is None:
            return None  # not a login with a password: nothing to throttle
        ip = client_ip(request) if request is not None else None
        attempt_id, _ = login_attempt_start(username=username, ip=ip)
        if attempt_id is None:
            raise PermissionDenied  # authenticate() stops here: not even the right password gets in
        user = _user_named(username)
        # The hash is checked in the passwords' pool, one of a few at once
        # (clinical/passwords.py), and the database is read and written only
        # here: a checker thread needs no connection of its own, so on
        # PostgreSQL it never waits for the pool while admin requests, each
        # holding a connection, wait for it (measured: 4 admin logins at once
        # failed with the pool's timeout).
        rehashed = []
        valid = in_turn(password_matches, password, None if user is None else user.password, rehashed)
        if valid and rehashed:
            user.password = rehashed[0]  # the hash upgraded to the current hasher, as Django does at login
            user.save(update_fields=["password"])
        if not (valid and self.user_can_authenticate(user)):
            login_failure_record(attempt_id=attempt_id, username=username, ip=ip)
            return None
        # This backend serves the admin, which turns away all but staff.
        with transaction.atomic():
            login_attempt_end(attempt_id, succeeded=True)
            audit_record(actor=user, action=Action.LOGIN, ip=ip, outcome="success" if user.is_staff else NOT_STAFF)
        return user


def _user_named(username: str):
    users = get_user_model()._default_manager
    try:
        return users.get_by_natural_key(username)
    except get_user_model().DoesNotExist:
        return None
