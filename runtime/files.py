"""Small file-system helpers shared by the writers of caches (converted weights, GGUF
imports, ttnn weight files): they write into temporary folders named with their process id
and clean up after writers that died."""
from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """A process with this id runs on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
