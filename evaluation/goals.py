"""The bone-removal goals: what a model must reach to count as removing bones, not just changing tone,
measured against the tone-curve baseline on the same test images (the demo prints the goals a
prediction folder misses; ``tests/test_demo.py`` checks that the baselines miss them)."""
from __future__ import annotations

# The demo's goals (keyword arguments of bone_removal_failures).
GOALS = {"min_hp32": 0.5, "min_hp64_over_tone": 0.05, "min_psnr_over_tone": 1.5, "min_ssim_over_tone": 0.0,
         "min_nodule_kept": 0.5}


def bone_removal_failures(m: dict, tone: dict, nodule: float | None, nodule_target: float | None,
                          min_hp32: float, min_hp64_over_tone: float, min_psnr_over_tone: float,
                          min_ssim_over_tone: float, min_nodule_kept: float) -> list[str]:
    """The criteria a prediction folder fails, each with its numbers; [] = it removes bones.

    Args:
        m, tone: ``metrics`` of metrics.py summaries (corrected mode) of the model and of the
            tone-curve baseline on the same images.
        nodule, nodule_target: mean nodule contrast of the model and of the target (None: no nodules).
        min_*: thresholds: the high-pass BSR at W/32, the margins over the tone curve (high-pass BSR
            at W/64, PSNR in dB, SSIM) and the share of the target's nodule contrast to keep.
    """
    def mean(d, k):
        return d[k]["mean"]

    checks = [(mean(m, "bsr_hp32") >= min_hp32, f"high-pass BSR (W/32) {mean(m, 'bsr_hp32'):.3f} < {min_hp32}"),
              (mean(m, "bsr_hp64") >= mean(tone, "bsr_hp64") + min_hp64_over_tone,
               f"high-pass BSR (W/64) {mean(m, 'bsr_hp64'):.3f} < tone curve {mean(tone, 'bsr_hp64'):.3f} "
               f"+ {min_hp64_over_tone}"),
              (mean(m, "psnr") >= mean(tone, "psnr") + min_psnr_over_tone,
               f"PSNR {mean(m, 'psnr'):.2f} dB < tone curve {mean(tone, 'psnr'):.2f} + {min_psnr_over_tone} dB"),
              (mean(m, "ssim") >= mean(tone, "ssim") + min_ssim_over_tone,
               f"SSIM {mean(m, 'ssim'):.4f} < tone curve {mean(tone, 'ssim'):.4f} + {min_ssim_over_tone}")]
    if nodule is not None and nodule_target:
        kept = nodule / nodule_target
        checks.append((kept >= min_nodule_kept, f"nodule contrast kept {kept:.2f} of the target's < {min_nodule_kept}"))
    return [why for ok, why in checks if not ok]
