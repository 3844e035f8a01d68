"""torch.hub entry point: a model this project trained, built as its file says (BlurPool included).

    model = torch.hub.load("path/to/imagenet-rn50", "model", "RUN_DIR/model.safetensors", source="local")
    model.card["classes"][model(x).argmax(1)[0]]["name"]     # x: (N, 3, val_res, val_res), normalised with
                                                             # model.card["mean"] / ["std"]

The path may be model.safetensors, checkpoints/best.pt, model_final.pth or the run folder itself.
"""

dependencies = ["torch", "torchvision", "safetensors", "yaml"]


def model(path, weights: str = "auto"):
    """The trained ResNet in eval mode on the CPU, its model card as `.card` (train.artifact.load_model)."""
    from train.artifact import load_model

    return load_model(path, weights=weights)
