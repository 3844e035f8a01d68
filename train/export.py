"""`python -m train.export RUN_DIR --out DIR [--format safetensors,onnx,pt2]`: the trained model for use elsewhere.

Writes into DIR, for the weights train.artifact.load finds in RUN_DIR (model.safetensors, else model_final.pth
or checkpoints/best.pt; a single file works too):
  model.safetensors + config.json   the weights and their model card (train/artifact.py)
  model.onnx                        input "images" (N, 3, val_res, val_res), float32, normalised with the card's
                                    mean/std; output "logits" (N, classes); dynamic batch, BlurPool inside, the
                                    card in the model's metadata_props. Checked with onnxruntime on the CPU.
  model.pt2                         a torch.export program of the same function (torch.export.load(p).module())
Flip-TTA is not inside the exports: where config.json says flip_tta, add the logits of the mirrored batch.
ONNX needs the `export` extra (pip install -e '.[export]': onnx, onnxruntime, onnxscript).
Exit status: 0 written; 2 bad arguments, an unreadable model, or a missing ONNX package (one line on stderr);
3 the ONNX model's logits differ from PyTorch's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from train import artifact

FORMATS = ("safetensors", "onnx", "pt2")
CHECK_TOLERANCE = 1e-3  # max |logit difference| between onnxruntime and PyTorch, relative to the largest logit


class ExportError(ValueError):
    """A request that cannot be carried out; the message names the flag or file."""


def _example(card: dict, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, card["val_res"], card["val_res"], generator=torch.Generator().manual_seed(0))


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The model with NCHW weights (channels_last is a speed choice of the trainer, not part of the function)."""
    return model.to(memory_format=torch.contiguous_format).eval()


def export_onnx(model: torch.nn.Module, card: dict, path: Path) -> float:
    """model.onnx with a dynamic batch; returns the largest |logit| difference onnxruntime vs PyTorch."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError(f"--format onnx: {exc.name} is not installed (pip install -e '.[export]')") from exc
    example = _example(card)
    batch = torch.export.Dim("batch", min=1, max=4096)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        # optimize=False: onnxruntime optimises the graph when it loads it; the exporter's pass only costs time
        program = torch.onnx.export(model, (example,), dynamo=True, optimize=False, input_names=["images"],
                                    output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
        program.save(str(tmp))
        proto = onnx.load(str(tmp))
        for key, value in card.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = _example(card, batch=3)  # another batch size than the traced one: the batch is dynamic
    with torch.no_grad():
        expected = model(check)
    got = torch.from_numpy(session.run(["logits"], {"images": check.numpy()})[0])
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-6))


def export_pt2(model: torch.nn.Module, card: dict, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (_example(card),), dynamic_shapes=({0: batch},))
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # torch.export.save wants a .pt2 name
    try:
        torch.export.save(program, str(tmp), extra_files={"config.json": json.dumps(card)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export(source: str | Path, out: str | Path, formats=FORMATS) -> dict[str, Path]:
    """Write the requested formats of the model at `source` (a run folder or file) into `out`."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"--format {','.join(formats)}: expected some of {','.join(FORMATS)}")
    try:
        loaded = artifact.load(source)
    except artifact.ArtifactError as exc:
        raise ExportError(str(exc)) from exc
    if loaded.assumed:
        print(f"train.export: {artifact.assumed_line(source, loaded.card)}", file=sys.stderr)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot create ({exc.strerror or exc})") from exc
    model, card, written = _plain(loaded.model), loaded.card, {}
    written["config.json"] = out / artifact.CARD_FILE
    if "safetensors" in formats:
        written["safetensors"] = artifact.save(out, model, card)
    else:
        (out / artifact.CARD_FILE).write_text(json.dumps(card, indent=1) + "\n")
    if "pt2" in formats:
        export_pt2(model, card, out / "model.pt2")
        written["pt2"] = out / "model.pt2"
    if "onnx" in formats:
        difference = export_onnx(model, card, out / "model.onnx")
        written["onnx"] = out / "model.onnx"
        if difference > CHECK_TOLERANCE:
            raise OnnxMismatch(f"{out / 'model.onnx'}: onnxruntime's logits differ from PyTorch's by {difference:.2e} "
                               f"of the largest logit (tolerance {CHECK_TOLERANCE:g})")
        print(f"onnxruntime check: logits within {difference:.1e} of PyTorch's (relative)")
    return written


class OnnxMismatch(RuntimeError):
    pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export",
                                description="Export a trained model: model.safetensors + config.json (its model card), "
                                            "ONNX (checked with onnxruntime) and a torch.export program.")
    p.add_argument("run_dir", help="a run folder (python -m train.main --out RUN_DIR) or one model file")
    p.add_argument("--out", required=True, type=Path, help="folder to write the exported files into")
    p.add_argument("--format", default=",".join(FORMATS),
                   help=f"comma-separated, some of {','.join(FORMATS)} (default: all)")
    args = p.parse_args(argv)
    try:
        written = export(args.run_dir, args.out, tuple(f.strip() for f in args.format.split(",") if f.strip()))
    except ExportError as exc:
        print(f"train.export: error: {exc}", file=sys.stderr)
        return 2
    except OnnxMismatch as exc:
        print(f"train.export: error: {exc}", file=sys.stderr)
        return 3
    card = json.loads(written["config.json"].read_text())
    print(f"{card['architecture']} ({'BlurPool, ' if card['blurpool'] else ''}{card['num_classes']} classes, val "
          f"{card['val_res']} px, crop {card['crop_ratio']:g}, flip-TTA {'on' if card['flip_tta'] else 'off'}): "
          f"wrote {', '.join(str(p) for p in written.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
