"""A writer process for the concurrency and crash tests: `python shard_writer_process.py STORE SOURCE SEED N [--hang-after K]`.

With --hang-after K it prints "WROTE" after K batches and then waits to be killed. An error of ours
is printed as one line, `ERROR <type>: <message>`, with exit code 2 (as the CLI does)."""

import sys
import time

from activation_store.errors import ActivationStoreError
from activation_store.store import open_store
from store_helpers import write_shard


def main() -> None:
    url, source, seed, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    hang_after = int(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[5] == "--hang-after" else None
    batches = [0]

    def on_batch(_):
        batches[0] += 1
        if hang_after is not None and batches[0] == hang_after:
            print("WROTE", flush=True)
            time.sleep(600)

    try:
        write_shard(open_store(url), source, seed, n, batch=2, dropped=1, on_batch=on_batch)
    except ActivationStoreError as exc:
        print(f"ERROR {type(exc).__name__}: {' '.join(str(exc).split())}", flush=True)
        sys.exit(2)
    print("COMMITTED", flush=True)


if __name__ == "__main__":
    main()
