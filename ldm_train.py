"""Stage 2: train the conditional latent noise estimator of BS-LDM / GL-LCM (docs/method.md §3), or
distil a trained one into a few-step latent consistency model (``ldm_train.mode: distill``, §4.5).

Usage:
    python ldm_train.py --config configs/demo.yaml --set ldm_train.vqgan_ckpt=runs/vqgan/000-demo/checkpoints/best.pt
    torchrun --standalone --nproc_per_node 4 ldm_train.py --config configs/szch.yaml \
        --set ldm_train.vqgan_ckpt=runs/vqgan/000-szch/checkpoints/best.pt
    python ldm_train.py --resume runs/ldm/000-demo [--set ldm_train.epochs=60]
    python ldm_train.py --config configs/demo.yaml configs/distill.yaml \
        --set distill.teacher_ckpt=runs/ldm/000-demo/checkpoints/best.pt        # consistency distillation

What it trains, the run folder and resuming: ``stages/train_ldm.py``.
"""
import sys

from stages.train_ldm import train_ldm
from utils.cli import run_training_cli, training_parser

if __name__ == "__main__":
    parser = training_parser("Train the conditional latent noise estimator (stage 2) or distil it.")
    sys.exit(run_training_cli(train_ldm, parser))
