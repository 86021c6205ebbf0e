"""Django settings: one module; the environment decides what differs."""

import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from clinical.replication_url import replica_url_checked
from clinical.secret_key import load_or_create_secret_key

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = BASE_DIR / "data"
BACKUP_DIR = BASE_DIR / "backups"

# Patient data: whatever this process creates (the database, its -wal and
# -shm, backups, temporary copies) is readable by its owner only, whatever
# umask it was started with. Modes of files made earlier are repaired at
# start (clinical.files).
os.umask(0o077)


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def _replica_url(value: str) -> str:
    try:
        return replica_url_checked(value)
    except ValueError as exc:
        raise ImproperlyConfigured(str(exc)) from None


def _positive_hours(name: str, default: str) -> float:
    try:
        hours = float(os.environ.get(name, default))
    except ValueError:
        hours = 0
    if not hours > 0:
        raise ImproperlyConfigured(f"{name} must be a number of hours above 0, such as 24.")
    return hours


def _prepare_threshold(value: str) -> int | None:
    if value.strip().lower() == "off":
        return None
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured("CLINICAL_DB_PREPARE_THRESHOLD must be a whole number or off") from None


DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or load_or_create_secret_key(DATA_DIR / "secret_key")
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1")

DB_PATH = Path(os.environ.get("CLINICAL_DB_PATH") or DATA_DIR / "clinical.db").expanduser().absolute()
DATABASE_URL = os.environ.get("DATABASE_URL", "").strip()

if DATABASE_URL:
    # PostgreSQL, for several app servers on one database (psycopg 3).
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
    if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        raise ImproperlyConfigured("DATABASE_URL must name a PostgreSQL database: postgres://user@host:port/name")
    # Threads that run the API's database work at once, each holding one
    # connection of the pool (clinical/connections.py); the pool has room for
    # the admin's and the commands' connections too.
    CLINICAL_DB_THREADS = int(os.environ.get("CLINICAL_DB_THREADS", "4"))
    CLINICAL_DB_POOL_SIZE = int(os.environ.get("CLINICAL_DB_POOL_SIZE", str(CLINICAL_DB_THREADS + 4)))
    DATABASES["default"]["OPTIONS"] = {
        **DATABASES["default"].get("OPTIONS", {}),
        "pool": {"min_size": 1, "max_size": CLINICAL_DB_POOL_SIZE, "timeout": 10},
        # Parameters bound by the server, and each statement prepared on a
        # connection once it has run there 5 times: PostgreSQL then neither parses
        # nor plans it again (a create's PostgreSQL CPU fell by a third, bench/).
        # "off" for a pooler that cannot keep prepared statements (PgBouncer
        # before 1.21 in transaction mode).
        "server_side_binding": True,
        "prepare_threshold": _prepare_threshold(os.environ.get("CLINICAL_DB_PREPARE_THRESHOLD", "5")),
    }
else:
    # SQLite, the embedded default: one file, one writer at a time, one database thread
    # for writes; the API's reads run beside it on reader threads (clinical/connections.py).
    DB_PATH.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    CLINICAL_DB_THREADS = 1
    CLINICAL_READ_THREADS = int(os.environ.get("CLINICAL_READ_THREADS", "2"))
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DB_PATH,
            # IMMEDIATE: a write transaction takes the write lock when it begins, so
            # concurrent writers queue on the busy timeout instead of failing.
            "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 5},
            # Django's advice for ASGI; the server keeps its one database thread's
            # connection open itself (clinical/connections.py).
            "CONN_MAX_AGE": 0,
            "ATOMIC_REQUESTS": False,
            "TEST": {"NAME": DB_PATH.with_name(f"test_{DB_PATH.name}")},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Continuous replication of the SQLite database with Litestream (clinical.replication): file:///absolute/path
# or s3://bucket/path; S3 keys only in LITESTREAM_ACCESS_KEY_ID and LITESTREAM_SECRET_ACCESS_KEY, which
# Litestream reads itself. On PostgreSQL, replication is PostgreSQL's own and this is not used.
CLINICAL_REPLICA_URL = _replica_url(os.environ.get("CLINICAL_REPLICA_URL", ""))
CLINICAL_REPLICA_S3_ENDPOINT = os.environ.get("CLINICAL_REPLICA_S3_ENDPOINT", "").strip()
CLINICAL_REPLICA_S3_REGION = os.environ.get("CLINICAL_REPLICA_S3_REGION", "").strip()
# How far back a point-in-time restore from the replica can go.
CLINICAL_REPLICA_RETENTION_HOURS = _positive_hours("CLINICAL_REPLICA_RETENTION_HOURS", "24")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_extensions",
    "ninja",
    "clinical",
    "recordings",
]

# Every middleware is async-capable; the API passes the session ones by
# without a thread hop (clinical/middleware.py).
MIDDLEWARE = [
    "clinical.middleware.api_responses",
    "clinical.middleware.SecurityMiddleware",
    "servestatic.middleware.ServeStaticMiddleware",
    "clinical.middleware.SessionMiddleware",
    "clinical.middleware.CommonMiddleware",
    "clinical.middleware.CsrfViewMiddleware",
    "clinical.middleware.AuthenticationMiddleware",
    "clinical.middleware.MessageMiddleware",
    "clinical.middleware.XFrameOptionsMiddleware",
    "clinical.middleware.api_tokens_checked",
]

# Django's deploy checks look for its own middleware paths; ours are subclasses
# of those three (hooks run inline). clinical/checks.py runs the same checks
# as if they were Django's, and tests/test_hardening.py asserts the subclasses.
SILENCED_SYSTEM_CHECKS = ["security.W001", "security.W002", "security.W003"]

ROOT_URLCONF = "clinical.urls"
ASGI_APPLICATION = "clinical.asgi.application"
WSGI_APPLICATION = "clinical.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

AUTHENTICATION_BACKENDS = ["clinical.backends.ThrottledModelBackend"]

# Behind an HTTPS proxy (CLINICAL_HTTPS=1): redirect to HTTPS, send HSTS, and
# keep cookies to HTTPS. `manage.py check --deploy` passes with it. The scheme
# comes from the proxy's X-Forwarded-Proto only when the proxy is one of
# CLINICAL_TRUSTED_PROXIES (uvicorn applies it, clinical/serve.py): Django's
# SECURE_PROXY_SSL_HEADER would believe that header from anyone.
HTTPS = os.environ.get("CLINICAL_HTTPS") == "1"
if HTTPS:
    SECURE_SSL_REDIRECT = True
    SECURE_HSTS_SECONDS = int(os.environ.get("CLINICAL_HSTS_SECONDS", str(365 * 24 * 3600)))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")
SESSION_COOKIE_AGE = 8 * 3600  # a working day
X_FRAME_OPTIONS = "DENY"
SECURE_REFERRER_POLICY = "same-origin"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

# Bodies over 2 MiB are refused with 413 before Django reads them (clinical/asgi.py).
CLINICAL_MAX_BODY_BYTES = 2 * 1024 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = CLINICAL_MAX_BODY_BYTES
FILE_UPLOAD_MAX_MEMORY_SIZE = CLINICAL_MAX_BODY_BYTES

# Kept at least 24 hours (the contract's floor); vacuumdb purges older ones.
CLINICAL_IDEMPOTENCY_TTL = timedelta(hours=max(24.0, float(os.environ.get("CLINICAL_IDEMPOTENCY_TTL_HOURS", "24"))))
# Stored answers hold patient data: a user's, within that time, take at most this many bytes.
CLINICAL_IDEMPOTENCY_MAX_BYTES_PER_USER = int(float(os.environ.get("CLINICAL_IDEMPOTENCY_MAX_MIB", "64")) * 2**20)
# Audit every API read of a recording (on unless CLINICAL_AUDIT_READS=0).
CLINICAL_AUDIT_READS = os.environ.get("CLINICAL_AUDIT_READS", "1") != "0"
# The audit trail's hash chain (clinical.chain): keyed with HMAC when a key is
# set (anyone who can write the database but lacks the key cannot forge it);
# events are sealed into it every CLINICAL_AUDIT_SEAL_SECONDS by each server
# process (0: only by verifyaudit and backupdb).
CLINICAL_AUDIT_KEY = os.environ.get("CLINICAL_AUDIT_KEY", "").encode()
CLINICAL_AUDIT_SEAL_SECONDS = float(os.environ.get("CLINICAL_AUDIT_SEAL_SECONDS", "1"))
# Login throttling: this many failures within the window, and logins answer 429.
CLINICAL_LOGIN_MAX_FAILURES_PER_USER = int(os.environ.get("CLINICAL_LOGIN_MAX_FAILURES_PER_USER", "5"))
CLINICAL_LOGIN_MAX_FAILURES_PER_IP = int(os.environ.get("CLINICAL_LOGIN_MAX_FAILURES_PER_IP", "20"))
CLINICAL_LOGIN_WINDOW_MINUTES = float(os.environ.get("CLINICAL_LOGIN_WINDOW_MINUTES", "15"))
# A page of the list or the feed ends early, with fewer items than its limit,
# once its recordings' text would take more than this many bytes of JSON (at
# least one item a page).
CLINICAL_PAGE_BUDGET = int(os.environ.get("CLINICAL_PAGE_BUDGET_BYTES", str(4 * 1024 * 1024)))
# Password checks at once (logins, API and admin): 0 means one fewer than the cores.
CLINICAL_PASSWORD_CHECKS = int(os.environ.get("CLINICAL_PASSWORD_CHECKS", "0"))
CLINICAL_TOKEN_TTL = timedelta(hours=float(os.environ.get("CLINICAL_TOKEN_TTL_HOURS", "12")))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
