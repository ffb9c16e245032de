"""The `ferry` console script: `ferry worker`, `ferry demo`, `ferry stages`, `ferry tiles`."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

log = logging.getLogger("ferry")


def _import_stage_modules(spec: str | None) -> None:
    for name in filter(None, (spec or "").split(",")):
        try:
            importlib.import_module(name.strip())
        except ImportError as e:
            raise SystemExit(f"ferry worker: cannot import stage module {name!r} given to --stages: {e}; "
                             "is it on PYTHONPATH?") from None


def _read_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as e:
        raise SystemExit(f"ferry worker: cannot read --token-file {path}: {e}") from None
    if not token:
        raise SystemExit(f"ferry worker: --token-file {path} is empty; write the bearer token into it")
    return token


def cmd_worker(args) -> int:
    from ferry.worker.server import MAX_MESSAGE_BYTES, create_server

    _import_stage_modules(args.stages)
    token = _read_token(args.token_file)
    if token is None and not args.insecure_no_token:
        raise SystemExit("ferry worker: a bearer token is required: pass --token-file FILE "
                         "(or --insecure-no-token for a throwaway local experiment)")
    server, port = create_server(f"{args.host}:{args.port}", token=token, max_workers=args.threads,
                                 max_message_bytes=args.max_message_bytes or MAX_MESSAGE_BYTES)
    server.start()
    if args.port_file:
        tmp = f"{args.port_file}.tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
    # Ready before the other built-in stage modules are imported: the first call that lists or
    # needs them pays for that, and a JVM waiting on this line to describe a stage does not.
    log.info("ferry worker serving on %s:%d (pid %d)", args.host, port, os.getpid())
    print(f"FERRY_WORKER_PORT={port}", flush=True)

    stopping = threading.Event()

    def stop(signum, _frame):
        if not stopping.is_set():
            stopping.set()
            log.info("signal %d: stopping the worker", signum)
            server.stop(grace=args.grace)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.exit_with_parent:
        threading.Thread(target=_watch_parent, args=(os.getppid(), stopping, server, args.grace),
                         name="ferry-parent-watch", daemon=True).start()
    server.wait_for_termination()
    return 0


def _watch_parent(parent: int, stopping: threading.Event, server, grace: float) -> None:
    # A worker whose JVM was killed outright (SIGKILL, OOM killer) would otherwise live on; when
    # the parent dies the worker is re-parented, so its parent pid changes. (PR_SET_PDEATHSIG
    # would fire when the JVM *thread* that started us exits, and Spark retires idle threads.)
    while not stopping.wait(1.0):
        if os.getppid() != parent:
            log.warning("parent process %d is gone: stopping the worker", parent)
            stopping.set()
            server.stop(grace=grace)
            return


def cmd_stages(args) -> int:
    from ferry import registry

    _import_stage_modules(args.stages)
    for st in registry.stages():
        print(f"{st.name} (v{st.version}, {st.kind}): {st.doc.splitlines()[0] if st.doc else ''}")
        for p in st.params:
            default = "required" if p.required else f"default {p.default!r}"
            print(f"    {p.name}: {p.type}, {default}. {p.doc}")
    return 0


def cmd_demo(args) -> int:
    from ferry import demo

    return demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferry", description="Python stages for JVM Spark, over gRPC and Arrow.")
    parser.add_argument("--log-level", default=os.environ.get("FERRY_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("worker", help="serve every registered stage over gRPC")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    w.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default)")
    w.add_argument("--token-file", help="file holding the bearer token every call must carry")
    w.add_argument("--insecure-no-token", action="store_true", help="accept calls without a token")
    w.add_argument("--port-file", help="write the bound port here once serving (atomically)")
    w.add_argument("--stages", help="comma-separated Python modules that register more stages")
    w.add_argument("--threads", type=int, default=8, help="concurrent calls (default 8)")
    w.add_argument("--max-message-bytes", type=int,
                   help="largest gRPC message either way; one row travels in one message "
                        "(default: ferry.worker.server.MAX_MESSAGE_BYTES, 512 MiB)")
    w.add_argument("--grace", type=float, default=5.0, help="seconds to finish calls on SIGTERM")
    w.add_argument("--exit-with-parent", action="store_true",
                   help="stop when the process that started the worker dies (used by the JVM pool)")
    w.set_defaults(func=cmd_worker)

    s = sub.add_parser("stages", help="list the registered stages and their params")
    s.add_argument("--stages", help="comma-separated Python modules that register more stages")
    s.set_defaults(func=cmd_stages)

    d = sub.add_parser("demo", help="the main job: convolve a generated series via Scala and PySpark")
    from ferry import demo
    demo.add_arguments(d)
    d.set_defaults(func=cmd_demo)

    from ferry import cli_lopq, cli_tiles
    cli_lopq.add_parser(sub)
    cli_tiles.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    return args.func(args)
