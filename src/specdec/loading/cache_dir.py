"""Where specdec keeps converted models: $SPECDEC_CACHE_DIR, else $XDG_CACHE_HOME/specdec, else ~/.cache/specdec."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    explicit = os.environ.get("SPECDEC_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "specdec"


def content_digest(path: Path) -> str:
    """A BLAKE2b digest of the file's whole content: what a derived model in the cache is keyed
    by, so that two files alike in size, header and tail (a fine-tune of the same shape) never
    share an entry. Hashing costs ~0.4 s per 100 MB here, so the digest is remembered per file
    version, as git's index does: by path, size, inode and modification and change times, which
    any rewrite of the file changes."""
    path = Path(path).resolve()
    stat = path.stat()
    version = f"{path}:{stat.st_size}:{stat.st_ino}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
    memo = cache_root() / "digests" / hashlib.sha256(version.encode()).hexdigest()[:32]
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    value = digest.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    staging = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
    staging.write_text(value)
    os.replace(staging, memo)
    return value
