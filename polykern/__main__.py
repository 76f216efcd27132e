"""``python -m polykern <command>``.

  info       what this install compiled and which paths are live here, and why not (``--json``)
  selftest   polykern.selftest.main(argv): the install checked on this machine's GPU
  export-lora  a save_adapters file -> a standard peft LoRA adapter folder (vLLM, SGLang, peft)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import Optional


def _info(args: argparse.Namespace) -> int:
    from ._build import build_info, format_info
    info = build_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _selftest(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("polykern.selftest") is None:
        print("polykern: this version has no selftest (polykern/selftest.py is missing)",
              file=sys.stderr)
        return 2
    from . import selftest  # imported only here: it may pull in more than `info` needs
    return selftest.main(args.rest)


def _export_lora(args: argparse.Namespace) -> int:
    import torch
    from .export import export_lora_file
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    config = export_lora_file(args.adapters, args.directory, dtype=dtype,
                              base_model_name_or_path=args.base_model,
                              fan_in_fan_out=args.fan_in_fan_out)
    print(f"wrote a peft LoRA adapter of {len(config['target_modules'])} layers, r={config['r']}"
          f" (serve with max LoRA rank >= {config['r']}) to {args.directory}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polykern", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    info = commands.add_parser("info", help="archs compiled, this GPU, live paths and why not")
    info.add_argument("--json", action="store_true", help="build_info() as JSON")
    info.set_defaults(run=_info)
    # selftest's own arguments (options included) go to polykern.selftest.main untouched
    selftest = commands.add_parser("selftest", help="check the install on this machine "
                                   "(arguments: polykern.selftest's)", add_help=False)
    selftest.set_defaults(run=_selftest)
    export = commands.add_parser(
        "export-lora", help="a polykern.save_adapters file as a standard peft LoRA adapter",
        description="Write the adapters of a polykern.save_adapters file as a peft LoRA adapter "
        "(adapter_config.json, adapter_model.safetensors): each layer's generated factors, the "
        "scaling folded into lora_B. No base model is needed.")
    export.add_argument("adapters", help="the .safetensors file polykern.save_adapters wrote")
    export.add_argument("directory", help="the folder to write (created if needed)")
    export.add_argument("--base-model", default=None,
                        help="base_model_name_or_path to record in adapter_config.json")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="cast the written tensors (default: the adapters' dtype)")
    export.add_argument("--fan-in-fan-out", action="store_true",
                        help="the adapted layers are GPT-2's Conv1D (the file does not say)")
    export.set_defaults(run=_export_lora)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "selftest":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
