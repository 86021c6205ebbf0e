"""What a restore must not bring back (tokens, sessions, old passwords, lifted throttles), and paths taken literally.

Real server processes on database files of their own, and the commands run as
an operator runs them: manage.py in a process of its own on the same file.
"""

import os
import re
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from django.contrib.auth.hashers import PBKDF2PasswordHasher

from tests.ops import break_a_page, integrity, manage, manage_started, query, sha256, write
from tests.server import PASSWORD, Server, clone_database

pytestmark = pytest.mark.sqlite_only  # SQLite's own files, pragmas and backup API

USERS = ("alice", "bob", "carol", "staffer")
NEW_PASSWORD = "a-new-password-set-after-the-backup"
PROMPT = b"Type 'yes' to go on: "
PROMPT_TIMEOUT = 60


@pytest.fixture(scope="session")
def users_db(tmp_path_factory):
    """A migrated database with USERS (tests.server's password each); staffer is a staff superuser."""
    template = Server(tmp_path_factory.mktemp("restore-users"))
    template.prepare(*USERS)
    write(template.db_path, "UPDATE auth_user SET is_staff = 1, is_superuser = 1 WHERE username = 'staffer'")
    return template.db_path


@pytest.fixture
def server(tmp_path, users_db):
    server = Server(tmp_path / "server")
    clone_database(users_db, server.db_path)
    server.start()
    yield server
    server.stop()


def backup(server: Server, output: Path) -> Path:
    done = manage(server.db_path, "backupdb", "--output-dir", str(output))
    assert done.returncode == 0, done.stderr
    return max(output.glob("clinical-*.db"))


def restore(server: Server, file: Path, output: Path) -> subprocess.CompletedProcess:
    done = manage(server.db_path, "restoredb", str(file), "--yes", "--output-dir", str(output))
    assert done.returncode == 0, done.stderr
    return done


def answers_to(server: Server, token: str) -> int:
    with server.client(token) as client:
        return client.get("/recordings").status_code


def login_answer(server: Server, username: str, password: str = PASSWORD) -> int:
    with server.client() as client:
        return client.post("/auth/token", json={"username": username, "password": password}).status_code


def quick_hash(password: str) -> str:
    # As tests.server stores passwords: PBKDF2 with few rounds, its parameters in the hash.
    hasher = PBKDF2PasswordHasher()
    return hasher.encode(password, hasher.salt(), iterations=1000)


def admin_login(client: httpx.Client, username: str) -> None:
    """Log `client` in to the admin through its login form."""
    form = client.get("/admin/login/")
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)[1]
    fields = {"csrfmiddlewaretoken": csrf, "username": username, "password": PASSWORD, "next": "/admin/"}
    answer = client.post("/admin/login/?next=/admin/", data=fields)
    assert answer.status_code == 302, answer.text[:500]


# Tokens, sessions and accounts


def test_a_token_revoked_after_the_backup_stays_refused_after_restoring_it(server, tmp_path):
    output = tmp_path / "backups"
    token = server.login("alice")
    backed_up = backup(server, output)
    with server.client(token) as client:
        revoked = client.delete("/auth/token").status_code

    restore(server, backed_up, output)

    assert revoked == 204
    assert server.running
    assert answers_to(server, token) == 401


def test_a_revoked_token_never_works_while_the_restore_runs(server, tmp_path):
    # The backup's tokens are revoked in the same step that puts it in place, not after migrate.
    output = tmp_path / "backups"
    token = server.login("alice")
    backed_up = backup(server, output)
    with server.client(token) as client:
        client.delete("/auth/token")
    seen, restoring = [], threading.Event()

    def poll():
        with server.client(token) as client:
            while restoring.is_set():
                seen.append(client.get("/auth/tokens").status_code)

    restoring.set()
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        restore(server, backed_up, output)
    finally:
        restoring.clear()
        poller.join()

    assert len(seen) > 10
    assert set(seen) == {401}


def test_every_token_issued_before_the_restore_is_refused_and_clinicians_log_in_again(server, tmp_path):
    output = tmp_path / "backups"
    before_backup = server.login("alice")
    backed_up = backup(server, output)
    after_backup = server.login("bob")
    valid = [answers_to(server, token) for token in (before_backup, after_backup)]

    restore(server, backed_up, output)

    assert valid == [200, 200]
    assert [answers_to(server, token) for token in (before_backup, after_backup)] == [401, 401]
    assert answers_to(server, server.login("alice")) == 200


def test_an_admin_session_ends_with_the_restore(server, tmp_path):
    output = tmp_path / "backups"
    with httpx.Client(base_url=server.url, timeout=30) as admin:
        admin_login(admin, "staffer")  # before the backup, so that the backup holds the session
        backed_up = backup(server, output)
        before = admin.get("/admin/")

        restore(server, backed_up, output)
        after = admin.get("/admin/")

    assert before.status_code == 200
    assert after.status_code == 302
    assert after.headers["Location"].startswith("/admin/login/")


def test_password_changes_deactivations_and_demotions_after_the_backup_survive_the_restore(server, tmp_path):
    output = tmp_path / "backups"
    backed_up = backup(server, output)
    write(server.db_path, "UPDATE auth_user SET password = ? WHERE username = 'alice'", [quick_hash(NEW_PASSWORD)])
    write(server.db_path, "UPDATE auth_user SET is_active = 0 WHERE username = 'bob'")
    write(server.db_path, "UPDATE auth_user SET is_staff = 0, is_superuser = 0 WHERE username = 'staffer'")

    done = restore(server, backed_up, output)

    assert login_answer(server, "alice", NEW_PASSWORD) == 201
    assert login_answer(server, "alice", PASSWORD) == 401
    assert login_answer(server, "bob") == 401
    assert login_answer(server, "carol") == 201  # untouched since the backup: as it was
    assert query(server.db_path, "SELECT is_active FROM auth_user WHERE username = 'bob'") == [(0,)]
    staff = query(server.db_path, "SELECT is_staff, is_superuser FROM auth_user WHERE username = 'staffer'")
    assert staff == [(0, 0)]
    assert f"password and status of {len(USERS)} accounts (3 changed since the backup)" in done.stdout


def test_recent_failed_logins_still_count_after_the_restore(server, tmp_path):
    output = tmp_path / "backups"
    backed_up = backup(server, output)
    failures = [login_answer(server, "alice", "a wrong guess") for _ in range(5)]

    restore(server, backed_up, output)

    assert failures == [401] * 5
    assert login_answer(server, "alice") == 429  # even with the right password, until the window passes


def test_the_restore_is_audited_in_the_restored_database(server, tmp_path):
    output = tmp_path / "backups"
    tokens = [server.login(username) for username in ("alice", "bob")]
    backed_up = backup(server, output)

    done = restore(server, backed_up, output)

    [safety] = sorted(set(output.glob("clinical-*.db")) - {backed_up})
    [(username, user_id, ip, outcome, detail)] = query(
        server.db_path,
        "SELECT username, user_id, client_ip, outcome, detail FROM clinical_auditevent WHERE action = 'restore'",
    )
    assert username.endswith(" (restoredb)")
    assert (user_id, ip, outcome) == (None, None, "success")
    assert f"restored {backed_up} (SHA-256 {sha256(backed_up)})" in detail
    assert f"saved to {safety}" in detail
    assert f"{len(tokens)} tokens revoked, 0 admin sessions ended" in detail
    assert f"security state of {len(USERS)} accounts carried over (0 changed)" in detail
    assert re.search(r"change-number high water \d+; 0 recordings renumbered above \d+", detail)
    assert query(server.db_path, "SELECT count(*) FROM clinical_token WHERE revoked_at IS NULL") == [(0,)]
    assert f"Revoked {len(tokens)} tokens and ended 0 admin sessions" in done.stdout


def test_a_restore_over_a_damaged_database_saves_it_says_so_and_goes_on(tmp_path, users_db):
    live = tmp_path / "live" / "clinical.db"
    live.parent.mkdir()
    clone_database(users_db, live)
    good = tmp_path / "good.db"
    clone_database(users_db, good)
    break_a_page(live, "auth_user")
    output = tmp_path / "backups"

    done = manage(live, "restoredb", str(good), "--yes", "--output-dir", str(output))

    assert done.returncode == 0, done.stderr
    assert "Could not read the accounts of the database replaced (database disk image is malformed)" in done.stdout
    [damaged] = output.glob("clinical-*-damaged.db")
    assert f"The current database, damaged, was saved to {damaged} first." in done.stdout
    assert integrity(live) == [("ok",)]
    [(detail,)] = query(live, "SELECT detail FROM clinical_auditevent WHERE action = 'restore'")
    assert "no account state carried over: the replaced database could not be read" in detail


# Paths taken literally


ODD = "odd #dir%41?x ü"  # what SQLite's URIs give a meaning to, and a character beyond ASCII


def _files(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()}


def test_backupdb_into_a_folder_with_uri_characters_writes_there_and_nowhere_else(tmp_path, users_db):
    live = tmp_path / "live" / "clinical.db"
    live.parent.mkdir()
    clone_database(users_db, live)
    output = tmp_path / ODD
    before = _files(tmp_path)

    done = manage(live, "backupdb", "--output-dir", str(output))

    assert done.returncode == 0, done.stderr
    [backup_file] = _files(tmp_path) - before
    assert backup_file.parent == output
    assert re.fullmatch(r"clinical-\d{8}T\d{6}Z\.db", backup_file.name)
    assert integrity(backup_file) == [("ok",)]
    assert f"Backed up to {backup_file}" in done.stdout


def _marked(template: Path, path: Path, mark: str) -> Path:
    clone_database(template, path)
    write(path, "CREATE TABLE test_mark (mark TEXT)")
    write(path, "INSERT INTO test_mark VALUES (?)", [mark])
    return path


def _mark(path: Path) -> str:
    return query(path, "SELECT mark FROM test_mark")[0][0]


@pytest.mark.parametrize(
    ("name", "decoy"),
    [("x%41.db", "xA.db"), ("odd#x.db", "odd"), ("what?x.db", "what"), ("sp ace ü.db", None)],
)
def test_restoredb_restores_the_file_it_is_named_and_no_other(tmp_path, users_db, name, decoy):
    live = tmp_path / "live" / "clinical.db"
    live.parent.mkdir()
    clone_database(users_db, live)
    file = _marked(users_db, tmp_path / name, "named")
    if decoy:
        _marked(users_db, tmp_path / decoy, "decoy")
    output = tmp_path / ODD

    done = manage(live, "restoredb", str(file), "--yes", "--output-dir", str(output))

    assert done.returncode == 0, done.stderr
    assert _mark(live) == "named"
    assert [path.name for path in output.iterdir() if not re.fullmatch(r"clinical-[0-9TZ]+\.db", path.name)] == []


def test_a_file_swapped_while_restoredb_asks_is_not_what_it_restores(tmp_path, users_db):
    live = tmp_path / "live" / "clinical.db"
    live.parent.mkdir()
    clone_database(users_db, live)
    file = _marked(users_db, tmp_path / "backup.db", "checked")
    swap = _marked(users_db, tmp_path / "swap.db", "swapped in after the check")
    output = tmp_path / "backups"
    controller, terminal = os.openpty()
    process = manage_started(
        live,
        "restoredb",
        str(file),
        "--output-dir",
        str(output),
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        asked = _wait_for(process.stdout, PROMPT)
        shutil.move(swap, file)  # what the command checked is no longer at that name
        os.write(controller, b"yes\n")
        out, err = process.communicate(timeout=PROMPT_TIMEOUT)
    finally:
        process.kill()
        os.close(controller)
        os.close(terminal)

    assert PROMPT in asked
    assert process.returncode == 0, err.decode()
    assert f"Restored {file}" in out.decode()
    assert _mark(live) == "checked"
    assert _mark(file) == "swapped in after the check"
    assert [path.name for path in output.iterdir() if path.name.startswith(".")] == []  # the private copy went


def _wait_for(stream, text: bytes) -> bytes:
    seen, deadline = b"", time.monotonic() + PROMPT_TIMEOUT
    while text not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.1)
        if ready:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
    return seen
