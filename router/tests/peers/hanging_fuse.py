"""A FUSE file system that serves the files of a folder, read-only, until a flag file
appears; from then on it answers no request at all (each waits forever), as a hostile or
wedged FUSE daemon does. For router/tests/hostile_files.rs.

    python3 hanging_fuse.py SOURCE_DIR MOUNTPOINT FLAG_FILE
"""

import errno
import os
import sys
import threading

from fuse import FUSE, FuseOSError, Operations

source, mountpoint, flag = sys.argv[1:4]
never = threading.Event()


def hang_if_flagged():
    if os.path.exists(flag):
        never.wait()


class Hanging(Operations):
    def _path(self, path):
        return os.path.join(source, path.lstrip("/"))

    def getattr(self, path, fh=None):
        hang_if_flagged()
        try:
            st = os.lstat(self._path(path))
        except FileNotFoundError:
            raise FuseOSError(errno.ENOENT)
        keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_atime", "st_mtime", "st_ctime")
        return {key: getattr(st, key) for key in keys}

    def readdir(self, path, fh):
        hang_if_flagged()
        return [".", ".."] + os.listdir(self._path(path))

    def open(self, path, flags):
        hang_if_flagged()
        return os.open(self._path(path), os.O_RDONLY)

    def read(self, path, size, offset, fh):
        hang_if_flagged()
        return os.pread(fh, size, offset)

    def release(self, path, fh):
        os.close(fh)


if __name__ == "__main__":
    # Attributes and pages are not cached by the kernel: every fstat asks the daemon.
    FUSE(Hanging(), mountpoint, foreground=True, nothreads=False, allow_other=True,
         ro=True, attr_timeout=0, entry_timeout=0, direct_io=False)
