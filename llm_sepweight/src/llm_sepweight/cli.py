"""`llm-sepweight convert | info | verify | files`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import torch

from llm_sepweight import format as fmt
from llm_sepweight.checkpoint import Checkpoint
from llm_sepweight.convert import convert
from llm_sepweight.spec import PartSpec
from llm_sepweight.verify import manifest_digest, verify

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
_DTYPES.update({"bfloat16": torch.bfloat16, "bf16": torch.bfloat16})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-sepweight",
        description="Per-layer weight directories for LLMs: convert, inspect, verify, list the files of a part.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="convert an HF directory, a .gguf file or a 0.10 directory")
    p.add_argument("src", help="HF checkpoint directory, .gguf file, or llm_sepweight 0.10 directory")
    p.add_argument(
        "out", help="the sepweight directory to write (must not exist, be empty, or be unfinished)"
    )
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="store floating tensors in this dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("info", help="describe a sepweight or HF checkpoint directory")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("verify", help="check a sepweight directory against its manifest (exit 1 if bad)")
    p.add_argument("path")
    p.add_argument("--no-hash", action="store_true", help="skip the SHA-256 check (sizes and headers only)")
    p.add_argument(
        "--list-unknown", action="store_true", help="list files the manifest does not know instead of failing"
    )
    p.add_argument("--manifest-sha256", help="fail unless manifest.json has this SHA-256")
    p = sub.add_parser("files", help="list the files a part spec needs, one a line")
    p.add_argument("spec", help='a part spec, e.g. "b 0-12" or "24-30 e"')
    p.add_argument("path", nargs="?", help="a checkpoint directory (needed for 'f' and HF directories)")
    return parser


def _info(path: str, as_json: bool) -> None:
    ckpt = Checkpoint(path)
    files = ckpt.files("f")
    info = {
        "path": str(ckpt.path),
        "kind": ckpt.kind,
        "architecture": ckpt.architecture,
        "num_layers": ckpt.num_layers,
        "tied_embeddings": ckpt.tied_embeddings,
        "files": len(files),
        "bytes": sum((ckpt.path / f).stat().st_size for f in files),
        "source": (ckpt.manifest or {}).get("source"),
    }
    if as_json:
        print(json.dumps(info, indent=1))
    else:
        for key, value in info.items():
            print(f"{key:16} {value}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        if args.command == "convert":
            out = convert(
                args.src, args.out, dtype=_DTYPES.get(args.dtype or ""), progress=not args.no_progress
            )
            print(out)
        elif args.command == "info":
            _info(args.path, args.json)
        elif args.command == "verify":
            unknown = verify(
                args.path,
                hashes=not args.no_hash,
                unknown="list" if args.list_unknown else "error",
                manifest_sha256=args.manifest_sha256,
            )
            for name in unknown:
                print(f"{args.path}: not covered by the manifest: {name}")
            print(f"{args.path}: OK (manifest.json SHA-256 {manifest_digest(args.path)})")
        elif args.command == "files":
            spec = PartSpec.parse(args.spec)
            if spec.full and not args.path:
                raise ValueError("'f' needs a checkpoint path to know the number of layers")
            names = Checkpoint(args.path).files(spec) if args.path else fmt.file_names(spec)
            print("\n".join(names))
    except (OSError, ValueError, KeyError, ImportError) as e:
        print(f"llm-sepweight {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
