"""img2dataset's ``Downloader`` with the URL policy installed in whichever process runs it.

img2dataset spawns its download workers (fresh interpreters) and pickles its Downloader into each by
reference, so this class is how the guard of `sd_core.data.download_guard` reaches them: the module is
imported there, and the first call installs the policy before anything is fetched; each call then leaves
the mark of the shard it downloads (`sd_core.data.download_guard.leave_guard_mark`), on Spark too. Its own
module because importing img2dataset is heavy, and the parent process only needs `download_guard`'s
constants.
"""

from __future__ import annotations

from typing import Any

from img2dataset.downloader import Downloader

from sd_core.data.download_guard import install_in_worker, leave_guard_mark


class GuardedDownloader(Downloader):
    """img2dataset's Downloader, installing the URL policy first (see the module doc)."""

    def __call__(self, row: Any) -> Any:
        install_in_worker()
        leave_guard_mark(self.output_folder, row[0])  # row: (shard_id, shard_file)
        return super().__call__(row)
