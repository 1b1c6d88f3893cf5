"""The `seerjax` command line: `seerjax <command> --help` for each command's flags.

Each command lives in its own module with `add_arguments(parser)` and `run(args) -> int`; they are
imported only when chosen, so `seerjax --help` is instant and one command's imports never slow another.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("seerjax.commands.demo", "the whole main job on the embedded default: pretrain, distill, evaluate"),
    "logits": ("seerjax.commands.logits", "load a Hugging Face checkpoint and print next-token predictions"),
    "convert": ("seerjax.commands.convert", "load a Hugging Face checkpoint and export it again (dtype change, check)"),
    "distill": ("seerjax.commands.distill", "train AttnGates by self-distillation on a frozen model"),
    "eval": ("seerjax.commands.evaluate", "perplexity, attention recall and retrieval vs density per method"),
    "pretrain": ("seerjax.commands.pretrain", "pretrain a small Llama-architecture base model"),
    "finetune": ("seerjax.commands.finetune", "long-context fine-tuning with sparse attention"),
}


def _available() -> dict:
    out = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, help_text)
    return out


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="seerjax", description="SeerAttention in JAX: learned block-sparse attention.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in _available().items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # User errors: one clear line, no traceback.
        print(f"seerjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
