"""Where a run's files live: a local folder (or a shared mount), or a URI on any pyarrow / fsspec
filesystem (s3://, gs://, hdfs://, abfs://, ...), for runs whose driver and learner workers are
on different nodes.

Every role reads and writes plain local files, as on one machine. For a URI those files are a
staging copy at the same path on every node (`~/.cache/larpo_ray/staging/<scheme>/<bucket>/<path>`,
`LARPO_STAGING` moves it), and each role copies what it wrote to the URI at fixed points with
pyarrow's filesystem layer, as Ray Train persists its checkpoints (`pyarrow.fs.copy_files`):

- the driver: config.yaml at the start; metrics.jsonl, steps.jsonl and eval/ after every
  iteration; a checkpoint's state.json and then latest.json once the learner's part is up (a
  checkpoint folder without state.json is incomplete: readers skip it, on a URI as on a disk);
  wandb/ and logs/ at the end;
- each learner rank: its part of a checkpoint (rank 0 the policy, every rank its optimizer state)
  and, rank 0, the final policy;
- a resume (`--resume URI`), a restarted learner and `larpo_ray.report URI` first copy what they
  read from the URI.

Credentials and endpoints come the filesystem's usual way (AWS_* / GOOGLE_* environment, instance
roles) or from the URI's query, e.g. `s3://bucket/runs/x?endpoint_override=host:9000&scheme=http`
for an S3-compatible store. Imports no Ray and no torch.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

STAGING_ENV = "LARPO_STAGING"


def is_uri(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


@dataclass(frozen=True)
class RunStorage:
    """A run folder: `local` is where this process reads and writes; `uri` (None for a local
    folder) is where those files are kept. Pickles as two strings (the filesystem is opened
    lazily in each process)."""

    local: str
    uri: str | None = None

    @classmethod
    def at(cls, location: str) -> RunStorage:
        """A local folder as is; a URI with its staging folder."""
        if not is_uri(location):
            return cls(str(Path(location.removeprefix("file://"))))
        parts = urlsplit(location)
        root = Path(os.environ.get(STAGING_ENV, "~/.cache/larpo_ray/staging")).expanduser()
        local = root / parts.scheme / re.sub(r"[^A-Za-z0-9._-]", "_", parts.netloc) / parts.path.strip("/")
        return cls(str(local), location)

    @property
    def remote(self) -> bool:
        return self.uri is not None

    @property
    def display(self) -> str:
        """What the user is told: the URI (without its query), else the folder."""
        return self.uri.split("?", 1)[0] if self.uri else self.local

    def push(self, rel: str) -> None:
        """Copy local/rel (a file or a folder) to the URI."""
        self.push_from(Path(self.local) / rel, rel)

    def push_from(self, source: Path, rel: str) -> None:
        """Copy local file or folder `source` to URI/rel."""
        if not self.remote:
            return
        import pyarrow.fs as pafs

        source = Path(source)
        if not source.exists():
            return
        fs, base = _filesystem(self.uri)
        target = _join(base, rel)
        if source.is_dir():
            fs.create_dir(target, recursive=True)
        else:
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(source), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    def pull(self, rel: str) -> bool:
        """Copy URI/rel (a file or a folder) to local/rel; False if it is not there."""
        if not self.remote:
            return (Path(self.local) / rel).exists()
        import pyarrow.fs as pafs

        fs, base = _filesystem(self.uri)
        info = fs.get_file_info(_join(base, rel))
        if info.type == pafs.FileType.NotFound:
            return False
        target = Path(self.local) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if info.type == pafs.FileType.Directory:
            target.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            _join(base, rel), str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        return True

    def exists(self, rel: str) -> bool:
        if not self.remote:
            return (Path(self.local) / rel).exists()
        import pyarrow.fs as pafs

        fs, base = _filesystem(self.uri)
        return fs.get_file_info(_join(base, rel)).type != pafs.FileType.NotFound

    def listdir(self, rel: str) -> list[str]:
        """Names directly under URI/rel (local folder: local/rel)."""
        if not self.remote:
            folder = Path(self.local) / rel
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        import pyarrow.fs as pafs

        fs, base = _filesystem(self.uri)
        infos = fs.get_file_info(pafs.FileSelector(_join(base, rel), allow_not_found=True))
        return sorted(i.base_name for i in infos)

    def delete(self, rel: str) -> None:
        """Remove URI/rel (a file or a folder) if it is there."""
        if not self.remote:
            return
        import pyarrow.fs as pafs

        fs, base = _filesystem(self.uri)
        info = fs.get_file_info(_join(base, rel))
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(info.path)


@functools.lru_cache(maxsize=8)
def _filesystem(uri: str):
    """(filesystem, base path) of a URI: pyarrow's own filesystems, else fsspec's through
    pyarrow's FSSpecHandler (as Ray Train resolves storage_path)."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception:  # pyarrow.lib.ArrowInvalid: a scheme pyarrow has no filesystem for
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _join(base: str, rel: str) -> str:
    rel = rel.strip("/")
    return f"{base.rstrip('/')}/{rel}" if rel and rel != "." else base.rstrip("/")
