"""Patient data on disk is readable by its owner only: folders 0700, files 0600.

The process umask (clinical/settings.py) makes everything created from now
on private; this repairs what was made before it, such as a database created
by an older version or a backups/ folder made by git. It runs at every start,
of the server and of every command, and says what it changed.
"""

import logging
import stat
from pathlib import Path

from django.conf import settings

logger = logging.getLogger(__name__)
FOLDER_MODE = 0o700
FILE_MODE = 0o600
SIDE_FILES = ("-wal", "-shm", "-journal")


def private_paths() -> list[Path]:
    """The folders and files that hold patient data or the secret key."""
    # The folders that are ours (never a shared one such as /tmp that CLINICAL_DB_PATH may name).
    database = Path(settings.DB_PATH)
    paths = [settings.DATA_DIR, database, *(database.with_name(database.name + s) for s in SIDE_FILES)]
    paths.append(settings.BACKUP_DIR)
    for folder in (settings.DATA_DIR, settings.BACKUP_DIR):
        if folder.is_dir():
            paths += sorted(folder.iterdir())
    return list(dict.fromkeys(Path(path) for path in paths))


def make_private(paths: list[Path]) -> list[Path]:
    """Take group and other access away from each existing path; the ones changed."""
    changed = []
    for path in paths:
        if path.is_symlink():
            continue  # chmod would follow it to a file that is not ours
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        if not mode & 0o077:
            continue
        wanted = FOLDER_MODE if path.is_dir() else FILE_MODE
        try:
            path.chmod(wanted)
        except OSError as exc:
            logger.error("%s is readable by others (mode %o) and could not be made private: %s", path, mode, exc)
            continue
        logger.warning("Made %s private: mode %o -> %o (patient data is for its owner only).", path, mode, wanted)
        changed.append(path)
    return changed
