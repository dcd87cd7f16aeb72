"""The ``adapterforge`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from adapterforge import __version__

logger = logging.getLogger("adapterforge")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapterforge",
        description="Self-hosted fine-tuning service: train, register and serve PEFT adapters.",
    )
    parser.add_argument("--version", action="version", version=f"adapterforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo-model",
        help="build the tiny, seeded demo base model (and tokenizer) into a local directory",
        description="Build a tiny seeded base model locally (no download) with save_pretrained.",
    )
    demo.add_argument("directory", help="where to write the model")
    demo.add_argument("--arch", choices=["llama", "gpt2"], default="llama", help="architecture (default: llama)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    db = sub.add_parser("db", help="database schema management (Alembic migrations)")
    db_sub = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    upgrade = db_sub.add_parser("upgrade", help="apply all migrations to ADAPTERFORGE_DATABASE_URL (default: SQLite in DATA_DIR)")
    upgrade.add_argument("--url", default=None, help="database URL (overrides the settings)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adapterforge`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo-model":
        from adapters_core.tiny_models import ensure_tiny_model

        path = ensure_tiny_model(args.directory, arch=args.arch, seed=args.seed)
        logger.info("demo %s model ready in %s", args.arch, path)
        return 0
    if args.command == "db":
        from app.registry.migrate import current_revision, upgrade
        from app.settings import Settings

        settings = Settings()
        url = args.url or settings.resolved_database_url
        if url.startswith("sqlite:///"):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(url)
        logger.info("database schema at revision %s", current_revision(url))
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
