"""Convert the authors' published BS-LDM / GL-LCM weights, or export a run, to this project's formats.

Usage:
    python convert_reference.py --method gl-lcm --dataset szch --unet UNET.pth --vqgan VQGAN.pth --out DIR
    python convert_reference.py --method bs-ldm --dataset jsrt --unet UNET.pth --vqgan VQGAN.pth --out DIR
    python convert_reference.py --export runs/ldm/000-demo/checkpoints/best.pt --out DIR [--weights ema]

What a conversion reads, checks and writes: ``stages/convert.py``.
"""
import sys

from stages.convert import build_parser, run
from utils.cli import entry_point


@entry_point(OSError)
def main(argv: list[str] | None = None) -> None:
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
