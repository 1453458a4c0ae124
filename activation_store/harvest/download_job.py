"""Runs img2dataset in its own process (it needs the main thread and a `__main__` guard):
`python -m activation_store.harvest.download_job JOB.json`."""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    from img2dataset import download

    download(**job)


if __name__ == "__main__":
    main()
