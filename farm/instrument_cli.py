"""`physfarm instrument serve`: put any system behind the instrument protocol (actors/instrument).

    physfarm instrument serve --system shg --port 5555 [--host 127.0.0.1] [--token SECRET] [--set noise=0]

Binds 127.0.0.1 unless --host says otherwise. The server itself lives in actors.instrument.server so a
lab PC can run it with only the actors package (`python -m actors.instrument.server ...`).
"""
from __future__ import annotations

import argparse


def cmd_instrument_serve(args: argparse.Namespace) -> int:
    from actors.instrument.server import run_from_args

    return run_from_args(args)


def add_instrument_parser(subparsers) -> argparse.ArgumentParser:
    """Register `instrument serve` on the `physfarm` subparsers; the handler returns an exit code."""
    from actors.instrument.server import add_serve_arguments

    p = subparsers.add_parser("instrument", help="network instruments (serve a system over TCP)")
    inner = p.add_subparsers(dest="instrument_command", required=True)
    serve = inner.add_parser(
        "serve", help="serve a simulator (or any system kind) over the instrument protocol",
        description="Serve one physfarm system over the framed TCP instrument protocol "
                    "(docs/instrument-protocol.md). Stop with Ctrl-C.")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_instrument_serve)
    return p
