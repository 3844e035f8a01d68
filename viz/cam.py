"""Grad-CAM heatmaps, batched: where the target layer's features raise the score of a chosen class."""

from __future__ import annotations

import numpy as np
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

# --method name -> grad-cam class; all weigh the activations of one target layer
CAM_METHODS = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "hirescam": pgc.HiResCAM,
               "xgradcam": pgc.XGradCAM, "layercam": pgc.LayerCAM, "eigencam": pgc.EigenCAM,
               "eigengradcam": pgc.EigenGradCAM, "scorecam": pgc.ScoreCAM, "ablationcam": pgc.AblationCAM}


def compute_cams(model: torch.nn.Module, target_layer: torch.nn.Module, images: torch.Tensor,
                 categories: list[int], method: str = "gradcam", batch_size: int = 32) -> np.ndarray:
    """(N, H, W) heatmaps in [0, 1]: where `target_layer`'s features raise the score of each image's category.
    One forward and one backward pass per `batch_size` images, on the model's device, in fp32."""
    if len(images) == 0:
        return np.zeros((0, *images.shape[-2:]), dtype=np.float32)
    device = next(model.parameters()).device
    heatmaps = []
    with CAM_METHODS[method](model=model, target_layers=[target_layer]) as cam:
        for start in range(0, len(images), batch_size):
            targets = [ClassifierOutputTarget(int(c)) for c in categories[start:start + batch_size]]
            chunk = images[start:start + batch_size].to(device, dtype=torch.float32)
            heatmaps.append(cam(input_tensor=chunk, targets=targets))
    return np.concatenate(heatmaps).astype(np.float32)


def cam_pairs(model: torch.nn.Module, target_layer: torch.nn.Module, images: torch.Tensor, predicted: list[int],
              true: list[int], method: str = "gradcam", batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(CAMs of the predicted classes, CAMs of the true classes) of the same images, in one batched run:
    the images go in twice, once per target, so each batch serves both columns."""
    both = compute_cams(model, target_layer, torch.cat([images, images]), list(predicted) + list(true), method,
                        batch_size)
    return both[:len(images)], both[len(images):]
