"""Torch files that may come from anyone (head files, exports, checkpoints) are read for tensors only
(`weights_only=True`, at each reader) and never for more memory than they hold: torch.save writes a zip whose
records are stored, not compressed, but torch.load inflates deflated records too, so a file of kilobytes could
load as gigabytes. Such a file is refused before torch reads it."""
from __future__ import annotations

import zipfile
from pathlib import Path

from dinoprobe.errors import DinoprobeError


def check_torch_file(path: str | Path, what: str) -> None:
    """Refuse a file that is not torch.save's zip format, or whose records are compressed or add up to more than
    the file (entries sharing their bytes). `what` names the file in the message ("weights", "head file")."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except OSError as err:  # missing, a folder, unreadable
        raise DinoprobeError(f"cannot read {what} '{path}': {err.strerror or err}") from None
    except (zipfile.BadZipFile, ValueError):
        raise DinoprobeError(f"cannot read {what} '{path}': not a torch.save file (damaged, or saved before torch "
                             "1.6's zip format: where you trust it, re-save it with torch.save(torch.load(path), "
                             "new_path))") from None
    size, total = path.stat().st_size, sum(r.file_size for r in records)
    if any(r.compress_type != zipfile.ZIP_STORED for r in records) or total > size:
        raise DinoprobeError(f"cannot read {what} '{path}': its zip records are compressed or overlap ({total:,} "
                             f"bytes when read, from a {size:,}-byte file), which torch.save never writes; it could "
                             "load as far more memory than it holds, so it is not read")
