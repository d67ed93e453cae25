"""A DICOM node beside a PACS: receives chest films, sends back the bone-suppressed soft-tissue series.

Usage:
    python dicom_node.py --ckpt CKPT --storage /var/lib/bonesup --forward 127.0.0.1:4242:ORTHANC
    python dicom_node.py --ckpt CKPT --storage DIR --forward pacs.local:104:PACS --ae-title BONESUP \\
        --port 11112 --bind 10.0.0.5 --allow-ae PACS,CR_ROOM1 --health-port 8043 --global-only

The node (library: ``node/``) accepts C-ECHO and C-STORE of CR and DX images from any calling AE, or
from those of ``--allow-ae`` only, refuses other objects with the proper status, stores each film in
``--storage`` before acknowledging it, runs the checkpoint on it exactly as ``ldm_eval.py`` does (one
model load for the node's life, ``--batch-size`` films per call) and sends the derived instance (a
new series of the same study) to ``--forward``, retrying with exponential back-off while the
destination is down. Stopped or killed, it resumes its queue from ``--storage`` when started again;
the same film sent twice is processed once. It listens on 127.0.0.1 unless ``--bind`` names another
address. One log line per study; ``GET http://127.0.0.1:PORT/health`` with ``--health-port``.
Runs until SIGINT / SIGTERM. Guide: docs/dicom_node.md.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from node.inference import NodeModel, node_config
from node.service import LOOPBACK, Node, parse_destination, quiet_pynetdicom, valid_ae_title
from node.storage import Storage
from utils.cli import entry_point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DICOM node: bone suppression of CR / DX films received from a PACS.")
    p.add_argument("--ckpt", required=True, help="stage-2 checkpoint (best.pt of ldm_train.py, or a distilled one)")
    p.add_argument("--storage", required=True, help="the node's folder (queue and state; created if needed)")
    p.add_argument("--forward", required=True, metavar="HOST:PORT:AET", help="where the derived series go (C-STORE)")
    p.add_argument("--ae-title", default="BONESUP", help="the node's AE title (default BONESUP)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port to listen on (default 11112; 0: any free)")
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only; "
                   "another address, e.g. 0.0.0.0, opens the node to the network)")
    p.add_argument("--allow-ae", metavar="A,B", help="accept associations from these calling AE titles only")
    p.add_argument("--batch-size", type=int, default=4, help="films per model call (default 4)")
    p.add_argument("--health-port", type=int, help="serve GET http://127.0.0.1:PORT/health (JSON)")
    p.add_argument("--retry-max", type=float, default=60.0, help="longest wait between tries to reach the "
                   "destination, seconds (default 60; the waits are 1, 2, 4 ... s)")
    p.add_argument("--keep", action="store_true", help="keep the received and derived files after delivery")
    p.add_argument("--config", nargs="+", default=None, metavar="FILE", help="configs instead of the checkpoint's own")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--global-only", action="store_true", help="global path only (no lung segmentation, no fusion)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    p.add_argument("--verbose", action="store_true", help="also pynetdicom's own log")
    return p


def log_line(line: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", flush=True)


@entry_point()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    forward = parse_destination(args.forward)
    allow = [a.strip() for a in args.allow_ae.split(",") if a.strip()] if args.allow_ae else None
    if args.allow_ae is not None and not allow:
        raise ValueError(f"--allow-ae {args.allow_ae!r}: no AE title given")
    if not valid_ae_title(args.ae_title):
        raise ValueError(f"--ae-title {args.ae_title!r}: must be 1 to 16 printable ASCII characters, no backslash")
    if not 0 <= args.port < 65536 or (args.health_port is not None and not 0 <= args.health_port < 65536):
        raise ValueError("--port / --health-port: a number in 0..65535")
    storage = Storage(args.storage, keep=args.keep)
    cfg = node_config(args.ckpt, args.overrides, args.config, args.global_only)
    model = NodeModel(args.ckpt, cfg, args.weights)
    quiet_pynetdicom(args.verbose)
    if args.bind not in LOOPBACK:
        log_line(f"warning: listening on {args.bind}, reachable from the network"
                 f"{'' if allow else '; any calling AE is accepted (see --allow-ae)'}")
    log_line(f"model {args.ckpt} loaded ({model.arithmetic}); {model.derivation}")
    try:
        node = Node(storage, model, args.ae_title, forward, port=args.port, bind=args.bind, allow_ae=allow,
                    batch_size=args.batch_size, health_port=args.health_port, retry_max=args.retry_max,
                    log=log_line).start()
    except OSError as err:                        # the port is taken, not allowed, ...
        print(f"error: cannot listen on {args.bind}:{args.port} ({err.strerror or err})", file=sys.stderr)
        return 2
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log_line("stopping; the queue stays in the storage folder")
    node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
