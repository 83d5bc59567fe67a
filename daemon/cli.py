"""`looptune` command line: daemon, config check/show, install-service."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Sequence

from looptune.daemon import __version__
from looptune.daemon import config as cfg

log = logging.getLogger("looptune")


def _setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    # journald adds its own timestamps; interactive runs get them from here
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("INVOCATION_ID") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger("looptune")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def cmd_daemon(args: argparse.Namespace) -> int:
    from looptune.daemon.http import ListenError
    from looptune.daemon.server import SocketInUse, UnsafeSocketDir
    from looptune.daemon.service import Daemon

    _setup_logging()
    try:
        config, path = cfg.load_resolved(args.config)
    except cfg.ConfigError as exc:
        for problem in exc.problems:
            log.error("%s: %s", exc.source, problem)
        return 1
    if args.listen:
        problem = cfg._check_listen(args.listen)
        if problem:
            log.error("--listen %r %s", args.listen, problem)
            return 2
    d = Daemon(config, config_cli_path=args.config, config_path=path, listen=args.listen,
               socket_path=args.socket)
    signal.signal(signal.SIGTERM, lambda *_: d.request_stop())
    signal.signal(signal.SIGINT, lambda *_: d.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: d.request_reload())
    try:
        d.start()
    except (OSError, SocketInUse, UnsafeSocketDir, ListenError) as exc:
        log.error("cannot start: %s", exc)
        d.shutdown()
        return 1
    return d.run()


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        cfg.load(args.file)
    except cfg.ConfigError as exc:
        for problem in exc.problems:
            print(f"{exc.source}: {problem}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    if args.defaults:
        sys.stdout.write(cfg.render_default())
        return 0
    try:
        config, path = cfg.load_resolved(args.config)
    except cfg.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    import dataclasses

    import yaml
    print(f"# from {path or 'built-in defaults'}")
    sys.stdout.write(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    return 0


def cmd_install_service(args: argparse.Namespace) -> int:
    from looptune.daemon.install import install_service

    return install_service(root=args.root, bin_path=args.bin)


def cmd_status(args: argparse.Namespace) -> int:
    from looptune.daemon import status

    if args.socket:
        paths = [args.socket]
    elif os.environ.get("LOOPTUNE_SOCKET"):
        paths = [os.environ["LOOPTUNE_SOCKET"]]
    else:
        try:
            config, _ = cfg.load_resolved(args.config)
        except cfg.ConfigError:
            config = cfg.Config()
        paths = [config.daemon.socket] if config.daemon.socket else \
            ["/run/looptune/looptune.sock"] + [p for p in cfg.default_socket_paths()
                                                if p != "/run/looptune/looptune.sock"]
    return status.main(paths, args.watch)


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from looptune.daemon import demo
        return demo.run(seconds=args.seconds, listen=args.listen)
    except ImportError as exc:
        print(f"looptune demo needs torch ({exc}); install it with: pip install torch==2.13.0 && "
              "pip install 'looptune[torch]'", file=sys.stderr)
        return 1


def cmd_report(args: argparse.Namespace) -> int:
    from looptune import report

    return report.cli(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="looptune", description="Monitor and auto-tune PyTorch training jobs.")
    p.add_argument("--version", action="version", version=f"looptune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("daemon", help="run the node daemon (Prometheus endpoint and hook socket)")
    d.add_argument("--config", help="config file (else $LOOPTUNE_CONFIG, /etc/looptune/config.yaml, defaults)")
    d.add_argument("--listen", help=f"HOST:PORT for /metrics (default from config, 0.0.0.0:{cfg.DEFAULT_PORT})")
    d.add_argument("--socket", help="Unix socket path for training hooks")
    d.set_defaults(func=cmd_daemon)

    c = sub.add_parser("config", help="check or show configuration")
    csub = c.add_subparsers(dest="config_command", required=True)
    chk = csub.add_parser("check", help="validate a config file: exit 0 if good, 1 with the problems")
    chk.add_argument("file", metavar="FILE",
                     help="the YAML config file to validate (the format of config.yaml: "
                     "`looptune config show --defaults`)")
    chk.set_defaults(func=cmd_config_check)
    show = csub.add_parser("show", help="print the effective config (or the documented defaults)")
    show.add_argument("--config", metavar="FILE",
                      help="config file to read (else $LOOPTUNE_CONFIG, /etc/looptune/config.yaml, "
                      "built-in defaults: the daemon's lookup order)")
    show.add_argument("--defaults", action="store_true", help="print the commented default config.yaml")
    show.set_defaults(func=cmd_config_show)

    st = sub.add_parser("status", help="the training jobs on this node, from the daemon")
    st.add_argument("--socket", help="daemon socket (default: $LOOPTUNE_SOCKET, then the daemon's default)")
    st.add_argument("--config", help="config file whose daemon.socket to use")
    st.add_argument("--watch", "-w", type=float, nargs="?", const=2.0, metavar="SECONDS",
                    help="refresh like top (default every 2 s)")
    st.set_defaults(func=cmd_status)

    dm = sub.add_parser("demo", help="a minute of an input-bound training loop that looptune speeds up "
                        "(needs the torch extra)")
    from looptune.daemon import demo    # argparse only: torch is imported when the demo runs
    demo.add_arguments(dm)
    dm.set_defaults(func=cmd_demo)

    r = sub.add_parser("report", help="HTML page with PNG plots of one training run, from Prometheus "
                       "(needs matplotlib: pip install 'looptune[report]')")
    from looptune import report  # argparse only: matplotlib is imported when a report is drawn
    report.add_arguments(r)
    r.set_defaults(func=cmd_report)

    i = sub.add_parser("install-service", help="install the systemd unit and /etc/looptune/config.yaml")
    i.add_argument("--root", default="/", help="install under this directory instead of /")
    i.add_argument("--bin", help="path of the looptune executable for ExecStart")
    i.set_defaults(func=cmd_install_service)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
