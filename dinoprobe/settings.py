"""Names and defaults shared by the library and the command line, declared once. Plain Python (no torch), so
`dinoprobe --help` and usage errors answer at once. A head's training settings are declared in train/config.py."""
from __future__ import annotations

DEFAULT_MODEL = "vit_small_patch16_dinov3.lvd1689m"
DEFAULT_IMAGE_SIZE = 224  # DINOv3's evaluation size (timm's pretrained_cfg says 256 for this family)

TRANSFORMS = ("timm", "dinov3")
DECODERS = ("pil", "torchvision")
AUGMENTATIONS = ("timm", "light")

# DINOv3's logistic regression: C in 10 ** linspace(-6, 5, 45)
DEFAULT_C_GRID = tuple(10 ** (-6 + 11 * i / 44) for i in range(45))
# DINO's weighted k-NN
KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07

# DINOv3's linear evaluation: 13 learning rates, SGD with momentum 0.9, cosine schedule, lr scaled by batch/256
PRESETS = ("dinov3-linear",)
DINOV3_LINEAR_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
# ... over n in {1, 4} last blocks x patch mean off/on
DINOV3_FEATURES = ("cls", "cls4", "cls+patch_mean", "cls4+patch_mean")
