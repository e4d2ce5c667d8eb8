"""Names and defaults shared by the library and the command line, declared once. Plain Python (no torch), so
`dinoprobe --help` and usage errors answer at once. A head's training settings are declared in train/config.py."""
from __future__ import annotations

DEFAULT_MODEL = "vit_small_patch16_dinov3.lvd1689m"
DEFAULT_IMAGE_SIZE = 224  # DINOv3's evaluation size (timm's pretrained_cfg says 256 for this family)

TRANSFORMS = ("timm", "dinov3", "square")
DECODERS = ("pil", "torchvision")
# where --decoder torchvision decodes: auto = on the extraction device when it is a GPU (nvJPEG), else in the workers
DECODE_ON = {"auto": None, "workers": False, "device": True}
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (~ 9459 x 9459)
AUGMENTATIONS = ("timm", "light")

# DINOv3's logistic regression: C in 10 ** linspace(-6, 5, 45)
DEFAULT_C_GRID = tuple(10 ** (-6 + 11 * i / 44) for i in range(45))
# DINO's weighted k-NN
KNN_KS = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07

# The named protocols: each exactly the reference code's defaults, with the file it follows (tests hold the table to
# the reference values). dinoprobe's own defaults differ on purpose where noted in the README.
DINOV3_LINEAR_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
_LINEAR = {"head": "linear", "optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0, "batch_size": 128,
           "epochs": 10, "epoch_length": 1250, "warmup_epochs": 0, "init": "normal", "select": "last",
           "normalize": "none", "label_smoothing": 0.0, "lrs": DINOV3_LINEAR_LRS, "lr_scaling": "lr x batch / 256"}
PROTOCOLS = {
    "dinov3-linear": {"source": "facebookresearch/dinov3 dinov3/eval/linear.py", **_LINEAR,
                      # n_last_blocks_list=(1,), `for avgpool in [True]`: the last block's CLS + the mean patch token
                      "features": ("cls+patch_mean",), "features_n4": ("cls4+patch_mean",),
                      "transform": "dinov3, resize 256 -> crop 224"},
    "dinov2-linear": {"source": "facebookresearch/dinov2 dinov2/eval/linear.py", **_LINEAR,
                      # n_last_blocks_list=[1, 4] x avgpool in [False, True]
                      "features": ("cls", "cls+patch_mean", "cls4", "cls4+patch_mean"),
                      "transform": "dinov3, resize 256 -> crop 224"},
    "dinov3-logreg": {"source": "facebookresearch/dinov3 dinov3/eval/log_regression.py", "normalize": "none",
                      "tol": 1e-12, "max_iter": 1000, "C_grid": "10 ** torch.linspace(-6, 5, 45), float32",
                      "refit": "train + val, except in few-shot", "val_carve": 0.1, "val_carve_few_shot": 0.01,
                      "transform": "dinov3 at crop_pct 1.0, resize 224 -> crop 224", "feature": "cls"},
    "dinov3-knn": {"source": "facebookresearch/dinov3 dinov3/eval/knn.py", "ks": (10, 20, 100, 200),
                   "temperature": 0.07, "report": "test top-1 for every k", "feature": "cls"},
    "dinov3-few-shot": {"source": "facebookresearch/dinov3 dinov3/eval/data.py", "percent": "max(floor(n x p), 1)",
                        "draw": "torch.Generator(seed=try), classes in label order, randperm[:n]",
                        "spread": "sample standard deviation (ddof 1)", "refit_on_val": False},
}
PRESETS = ("dinov3-linear", "dinov2-linear")
# `dinoprobe evaluate --protocol NAME`: the linear preset it runs (logistic regression and k-NN are DINOv3's in both)
EVAL_SUITES = {"dinov3": "dinov3-linear", "dinov2": "dinov2-linear"}

# `features --task`: one label per image, any number (sigmoid heads, chosen on mAP), or detected from the data
TASKS = ("auto", "single", "multilabel")

# Rows scored at once when a run's metrics are computed (and k-NN chooses k): a split's (rows x classes) float64
# probabilities are 8 GB at iNaturalist 2021's 100,000 validation images and 10,000 classes. A block holds 24 bytes
# a (row, class) cell at its peak (the logits, their float64 copy and the probabilities; measured 24.1-24.2), so with
# many classes it has fewer rows: at most SCORING_BYTES (8,192 rows up to 1,365 classes, 1,118 at 10,000).
SCORING_ROWS_PER_BLOCK = 8192
SCORING_BYTES = 256 << 20
SCORE_CELL_BYTES = 24
# Validation rows evaluated at once while heads train (every epoch): their logits and hidden activations, for all
# the heads side by side, within this (8,192 rows of a 10,000-class head were 0.3 GB beside the training)
VAL_CHUNK_ROWS = 8192  # for one head; N side by side take VAL_CHUNK_ROWS // N (at least 256)
VAL_CHUNK_BYTES = 64 << 20
# Multi-label metrics rank every row of a class, so a split is scored whole: its probabilities, each class's sort
# and micro mAP's sort of every pair; measured 55-79 bytes a cell (20,000 x 500, as the allocator's reuse falls)
MULTILABEL_SCORE_CELL_BYTES = 88


def scoring_rows(classes: int) -> int:
    """Rows of a single-label split scored at once: SCORING_ROWS_PER_BLOCK, or fewer to stay within SCORING_BYTES."""
    return max(1, min(SCORING_ROWS_PER_BLOCK, SCORING_BYTES // (SCORE_CELL_BYTES * max(1, classes))))
