"""CLINICAL_REPLICA_URL, checked when the settings load: a replica Litestream can write, and no secret in it.

Its own module, so that the settings can use it before Django is set up.
"""

from urllib.parse import unquote, urlsplit


def replica_url_checked(value: str) -> str:
    """CLINICAL_REPLICA_URL as given when it names a replica Litestream can write, else a ValueError saying why."""
    value = value.strip()
    if not value:
        return ""
    parts = urlsplit(value)
    if parts.username is not None or parts.password is not None:  # checked first: the value is not repeated
        raise ValueError(
            "CLINICAL_REPLICA_URL must not carry credentials: give S3 keys in LITESTREAM_ACCESS_KEY_ID and "
            "LITESTREAM_SECRET_ACCESS_KEY."
        )
    if parts.scheme not in ("file", "s3"):
        raise ValueError(f"CLINICAL_REPLICA_URL must be file:///absolute/path or s3://bucket/path, not {value!r}.")
    if parts.query or parts.fragment:
        raise ValueError(
            f"CLINICAL_REPLICA_URL takes no ?query or #fragment ({value!r}): set an S3 endpoint and region with "
            "CLINICAL_REPLICA_S3_ENDPOINT and CLINICAL_REPLICA_S3_REGION."
        )
    if parts.scheme == "s3" and not parts.netloc:
        raise ValueError(f"CLINICAL_REPLICA_URL must name a bucket: s3://bucket/path, not {value!r}.")
    if parts.scheme == "file":
        if parts.netloc:
            raise ValueError(
                f"CLINICAL_REPLICA_URL names a folder of this machine with three slashes: file:///absolute/path, "
                f"not {value!r}."
            )
        if not unquote(parts.path).startswith("/") or unquote(parts.path).strip("/") == "":
            raise ValueError(
                f"CLINICAL_REPLICA_URL needs an absolute folder, such as file:///mnt/replica/clinical, not {value!r}."
            )
    return value
