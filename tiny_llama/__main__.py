"""``python -m tiny_llama [SIZE ...]``: build (or find) the cached models and print their folders."""

from __future__ import annotations

import argparse
import json
import sys
import time

from tiny_llama.factory import SIZES, ensure_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiny_llama", description=__doc__)
    parser.add_argument("sizes", nargs="*", default=["tiny"], choices=sorted(SIZES), metavar="SIZE",
                        help=f"one or more of {sorted(SIZES)} (default: tiny)")
    args = parser.parse_args(argv)
    for size in args.sizes:
        start = time.perf_counter()
        print(f"tiny_llama: preparing '{size}' ...", file=sys.stderr, flush=True)
        folder = ensure_model(size)
        manifest = json.loads((folder / "manifest.json").read_text())
        print(f"{size}\t{manifest['num_parameters']:,} parameters\t{folder}"
              f"\t({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
