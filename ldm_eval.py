"""Stage 3: bone suppression of a split or a folder of radiographs with a trained latent diffusion model.

Usage:
    python ldm_eval.py --ckpt runs/ldm/000-demo/checkpoints/best.pt                   # the test split
    python ldm_eval.py --ckpt CKPT --split val --set sampler.steps=8
    python ldm_eval.py --ckpt CKPT --input some/cxr_folder --out some/output_folder
    python ldm_eval.py --ckpt CKPT --set sampler.name=ddpm --set sampler.steps=1000 \
        --set sampler.clip_r0_global=1.4 --set sampler.clip_kappa=0.003          # BS-LDM's sampler
    python ldm_eval.py --ckpt CKPT --input FOLDER --precision fp32 --no-channels-last   # plain fp32
    torchrun --standalone --nproc_per_node 4 ldm_eval.py --ckpt CKPT --input ARCHIVE --out OUT

What it does, its outputs, resuming, sharding and exit statuses: ``stages/suppress.py``.
Score the outputs with ``metrics.py --cxr ROOT/CXR --gt ROOT/BS --pred OUT --list LIST``.
"""
import sys

from stages.suppress import build_parser, config_for, exit_status, suppress_images
from utils.cli import entry_point


@entry_point()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = suppress_images(config_for(args), args.ckpt, split=args.split, input_dir=args.input_dir,
                              out_dir=args.out_dir, weights=args.weights, batch_size=args.batch_size,
                              overwrite=args.overwrite, masks_dir=args.masks_dir, save_paths=args.save_paths,
                              progress=args.progress)
    return exit_status(summary, summary["processes"] > 1)


if __name__ == "__main__":
    sys.exit(main())
