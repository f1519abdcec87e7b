"""Host a TCPStore server in its own process: ``python -m fault_injection._store_host PORT``.

Prints the bound port on the first stdout line once it accepts connections, then serves until stdin reaches EOF
(the controlling process closed it or died) or a SIGTERM/SIGINT arrives, so the store never outlives its owner.
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", port, is_master=True, use_libuv=True, wait_for_workers=False)
    sys.stdout.write(f"{store.port}\n")
    sys.stdout.flush()
    try:
        sys.stdin.read()  # returns at EOF: our owner is gone or done
    except KeyboardInterrupt:
        pass
    del store


if __name__ == "__main__":
    main()
