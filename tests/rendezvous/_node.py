"""One simulated node for multi-process rendezvous tests: prints one JSON line per outcome on stdout.

Actions: ``join`` (rendezvous once, leave), ``rejoin`` (rendezvous, then re-rendezvous as soon as
num_nodes_waiting() > 0, leave), ``watch`` (rendezvous, then report when the participants change), ``reform``
(like ``watch``, then rendezvous again with whoever is left, like an agent whose peer died), ``host`` (host a
TCPStore on the endpoint's port and sleep).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["join", "rejoin", "watch", "reform", "host"])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--backend", default="c10d")
    parser.add_argument("--run-id", default="test")
    parser.add_argument("--min", type=int, default=1)
    parser.add_argument("--max", type=int, default=1)
    parser.add_argument("--join-timeout", default="10")
    parser.add_argument("--last-call", default="1")
    parser.add_argument("--keep-alive", default="0.5")
    parser.add_argument("--read-timeout", default="5")
    parser.add_argument("--liveness", default="10")
    parser.add_argument("--hold", type=float, default=0.0, help="after rendezvous, keep heartbeating this long")
    args = parser.parse_args()

    if args.action == "host":
        from datetime import timedelta

        from torch.distributed import TCPStore

        host, port = args.endpoint.rsplit(":", 1)
        store = TCPStore(host, int(port), is_master=True, timeout=timedelta(seconds=5), use_libuv=True)
        emit(event="hosting", port=store.port)
        time.sleep(600)
        return 0

    from elastic_impl.rendezvous import RendezvousError, RendezvousParameters, rendezvous_handler_registry

    handler = None
    try:
        params = RendezvousParameters(
            args.backend,
            args.endpoint,
            args.run_id,
            args.min,
            args.max,
            is_host="false",
            join_timeout=args.join_timeout,
            last_call_timeout=args.last_call,
            keep_alive_interval=args.keep_alive,
            read_timeout=args.read_timeout,
            store_liveness_timeout=args.liveness,
        )
        handler = rendezvous_handler_registry.create_handler(params)
        info = handler.next_rendezvous()
        emit(event="rendezvous", rank=info.rank, world_size=info.world_size, round=handler.get_round(), node=str(handler.node))
        if args.action == "rejoin":
            while handler.num_nodes_waiting() == 0:
                time.sleep(0.1)
            info = handler.next_rendezvous()
            emit(event="rendezvous", rank=info.rank, world_size=info.world_size, round=handler.get_round(), node=str(handler.node))
        elif args.hold:
            # Idle like an agent whose workers run: only the keep-alive thread and num_nodes_waiting() polls
            # touch the store, so a store host that goes silent must still surface as an error.
            deadline = time.monotonic() + args.hold
            while time.monotonic() < deadline:
                handler.num_nodes_waiting()
                time.sleep(0.1)
        elif args.action in ("watch", "reform"):
            before = handler.get_participants()
            while handler.get_participants() == before:
                time.sleep(0.1)
            emit(event="participants_changed", before=before, after=handler.get_participants())
            if args.action == "reform":
                info = handler.next_rendezvous()
                emit(event="rendezvous", rank=info.rank, world_size=info.world_size, round=handler.get_round(),
                     node=str(handler.node))
        handler.leave()
        return 0
    except RendezvousError as e:
        emit(event="error", type=type(e).__name__, message=str(e))
        return 1
    finally:
        if handler is not None:
            handler._stop_keep_alive()


if __name__ == "__main__":
    sys.exit(main())
