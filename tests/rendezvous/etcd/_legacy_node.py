"""One node of the legacy ``etcd`` rendezvous for multi-process tests (JSON lines on stdout, like ../_node.py).

Actions: ``join`` (rendezvous once, exit without closing), ``rejoin`` (rendezvous, then again once
num_nodes_waiting() > 0), ``hold`` (rendezvous, then keep renewing the keep-alive until killed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tests.rendezvous._node import emit


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["join", "rejoin", "hold"])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--run-id", default="test")
    parser.add_argument("--min", type=int, default=1)
    parser.add_argument("--max", type=int, default=1)
    parser.add_argument("--timeout", default="10")
    parser.add_argument("--last-call", default="0.5")
    parser.add_argument("--keep-alive-ttl", default="10")
    args = parser.parse_args()

    from elastic_impl.rendezvous import RendezvousError, RendezvousParameters, rendezvous_handler_registry

    handler = None
    try:
        params = RendezvousParameters(
            "etcd", args.endpoint, args.run_id, args.min, args.max,
            timeout=args.timeout, last_call_timeout=args.last_call, keep_alive_ttl=args.keep_alive_ttl,
            read_timeout=5,
        )
        handler = rendezvous_handler_registry.create_handler(params)

        def rendezvous() -> None:
            info = handler.next_rendezvous()
            emit(event="rendezvous", rank=info.rank, world_size=info.world_size, node=str(os.getpid()),
                 addr=info.bootstrap_store_info.master_addr, port=info.bootstrap_store_info.master_port)

        rendezvous()
        if args.action == "rejoin":
            while handler.num_nodes_waiting() == 0:
                time.sleep(0.1)
            rendezvous()
        elif args.action == "hold":
            time.sleep(600)
        return 0
    except RendezvousError as e:
        emit(event="error", type=type(e).__name__, message=str(e))
        return 1
    finally:
        if handler is not None:
            handler._rdzv_impl.stop_leases()


if __name__ == "__main__":
    sys.exit(main())
