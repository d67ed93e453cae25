"""Stage 1: train the ML-VQGAN with the multi-level hybrid loss (docs/method.md §2).

Usage:
    python vq-gan_train.py --config configs/demo.yaml
    python vq-gan_train.py --config configs/szch.yaml --set data.root=/data/SZCH-X-Rays
    torchrun --standalone --nproc_per_node 4 vq-gan_train.py --config configs/szch.yaml
    python vq-gan_train.py --resume runs/vqgan/000-demo [--set vq_train.epochs=40]

What it trains, the run folder and resuming: ``stages/train_vqgan.py``.
"""
import sys

from stages.train_vqgan import train_vqgan
from utils.cli import run_training_cli, training_parser

if __name__ == "__main__":
    sys.exit(run_training_cli(train_vqgan, training_parser("Train the ML-VQGAN (stage 1).")))
