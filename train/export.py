"""`python -m train.export RUN_DIR --out DIR [--format safetensors,onnx,pt2]`: the trained model for use elsewhere.

Writes into DIR, for the weights train.artifact.load finds in RUN_DIR (model.safetensors, else model_final.pth
or checkpoints/best.pt; a single file works too):
  model.safetensors + config.json   the weights and their model card (train/artifact.py)
  model.onnx                        input "images" (N, 3, val_res, val_res), float32, normalised with the card's
                                    mean/std; output "logits" (N, classes); dynamic batch, BlurPool inside, the
                                    card in the model's metadata_props. Checked with onnxruntime on the CPU.
  model.pt2                         a torch.export program of the same function (torch.export.load(p).module())
  README.md (--card)               a Hugging Face model card: YAML metadata (library, tags, license, the datasets
                                    and a model-index with the top-1/top-5 the trainer measured on these weights,
                                    naming the validation set) and a body (results, how to load, the recipe from
                                    RUN_DIR/config.yaml, the data from the shards' manifest.json, curves and
                                    Grad-CAM grid when there are PNGs, limitations), with config.yaml and the
                                    PNGs copied beside it
Flip-TTA is not inside the exports: where config.json says flip_tta, add the logits of the mirrored batch.
ONNX needs the `export` extra (pip install -e '.[export]': onnx, onnxruntime, onnxscript).
`--push-to-hub USER/NAME` (implies --card) uploads DIR to that Hub model repo (created if missing, private with
--private) with huggingface_hub's HfApi; the token comes from the usual places (HF_TOKEN, `hf auth login`) and
is never printed.
Exit status: 0 written; 2 bad arguments, an unreadable model, or a missing ONNX package (one line on stderr);
3 the ONNX model's logits differ from PyTorch's; 4 the upload to the Hub failed.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import yaml

from preprocess.cli import ArgumentParser
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


# ----------------------------------------------------------------------------- the model card

CARD_NAME = "README.md"
IMAGENET_DATASET = "ILSVRC/imagenet-1k"
IMAGENET_VAL_IMAGES = 50_000
PROJECT = "imagenet-rn50"


def run_folder(source: str | Path) -> Path:
    """The run folder of `source`: itself, or the folder holding the file (RUN_DIR/checkpoints/x.pt -> RUN_DIR)."""
    source = Path(source)
    if source.is_dir():
        return source
    return source.parent.parent if source.parent.name == "checkpoints" else source.parent


def _config_header(text: str) -> dict:
    """The facts train.main writes in config.yaml's comment header: data folder, global batch, peak lr."""
    facts = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if match := re.match(r"#\s*data:\s*(.+)$", line):
            facts["data"] = match.group(1).strip()
        if match := re.search(r"global batch (\d+) on (\d+) process", line):
            facts["global_batch"], facts["processes"] = int(match.group(1)), int(match.group(2))
        if match := re.search(r"peak lr ([0-9.eE+-]+)", line):
            facts["peak_lr"] = float(match.group(1))
    return facts


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's epoch records (unreadable lines skipped: the card only quotes them)."""
    records = []
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "epoch" in record:
            records.append(record)
    return records


def _imagenet_wnids() -> list[str]:
    from preprocess.sources import imagenet_classes

    return [c.wnid for c in imagenet_classes()]


def validation_set(card: dict) -> dict:
    """Which validation set the card's top-1 was measured on: name and Hub dataset type, and `kind`: "full"
    (ImageNet-1k's 50,000 validation images), "subset" (fewer of them), "other" (another class list: a small or
    synthetic run) or "unknown" (the file stores no class list). `imagenet`: the classes are ImageNet-1k's."""
    wnids = [c.get("wnid") for c in card.get("classes") or []]
    imagenet = card["num_classes"] == 1000 and wnids == _imagenet_wnids()
    images = card.get("val_images")
    count = f"{images:,}" if isinstance(images, int) else "an unknown number of"
    if imagenet:
        full = images == IMAGENET_VAL_IMAGES
        name = (f"ImageNet-1k validation ({IMAGENET_VAL_IMAGES:,} images)" if full else
                f"ImageNet-1k validation, {count} of {IMAGENET_VAL_IMAGES:,} images")
        return {"name": name, "type": IMAGENET_DATASET, "split": "validation", "kind": "full" if full else "subset",
                "full": full, "imagenet": True, "images": count}
    if wnids:
        name = f"the run's own validation split ({count} images, {card['num_classes']} classes; not ImageNet-1k)"
        kind = "other"
    else:
        name = f"the run's own validation split ({count} images; no class list stored: not known to be ImageNet-1k)"
        kind = "unknown"
    return {"name": name, "type": "custom", "split": "validation", "kind": kind, "full": False, "imagenet": False,
            "images": count}


def _percent(value) -> float | None:
    return None if value is None else round(100 * float(value), 2)


def card_metadata(card: dict, *, name: str, license: str, formats=()) -> dict:
    """The YAML front matter: what the Hub indexes (library, tags, license, datasets, model-index)."""
    val = validation_set(card)
    tags = ["image-classification", "pytorch", "safetensors", "resnet", card["architecture"], PROJECT]
    tags += ["blurpool"] * card["blurpool"] + ["onnx"] * ("onnx" in formats)
    meta = {"library_name": "pytorch", "pipeline_tag": "image-classification", "license": license}
    if license == "other":  # the Hub asks an "other" license for a name
        meta["license_name"] = "imagenet-terms-of-access" if val["imagenet"] else "unspecified"
    meta["tags"] = tags
    if val["imagenet"]:
        meta["datasets"] = [IMAGENET_DATASET]
    metrics = []
    if card.get("top1") is not None:
        metrics.append({"type": "accuracy", "value": _percent(card["top1"]), "name": "Top-1 accuracy (%)"})
    if card.get("top5") is not None and card["num_classes"] > 5:
        metrics.append({"type": "top_5_accuracy", "value": _percent(card["top5"]), "name": "Top-5 accuracy (%)"})
    if metrics:
        meta["model-index"] = [{"name": name, "results": [{
            "task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"name": val["name"], "type": val["type"], "split": val["split"]},
            "metrics": metrics}]}]
    return meta


def _table(rows) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def _recipe(config: dict | None, header: dict) -> str:
    if not config:
        return "No `config.yaml` came with these weights: the recipe is unknown.\n"
    model, optim, schedule, val, ema, run = (config.get(name) if isinstance(config.get(name), dict) else {}
                                             for name in ("model", "optim", "schedule", "val", "ema", "run"))
    blurpool = " with BlurPool on the strided convs" if model.get("blurpool") else ""
    rows = [("architecture", f"{model.get('arch')}{blurpool}{', channels_last' if model.get('channels_last') else ''}"),
            ("epochs", schedule.get("epochs")),
            ("global batch (images per step)", f"{header['global_batch']} on {header['processes']} process(es)"
             if "global_batch" in header else "see config.yaml"),
            ("optimizer", f"SGD, momentum {optim.get('momentum')}, weight decay {optim.get('weight_decay')} (none on "
                          f"BatchNorm and biases), label smoothing {optim.get('label_smoothing')}"),
            ("learning rate", f"{optim.get('lr_per_256')} per 256 images" + (f" (peak {header['peak_lr']:g})"
                                                                            if "peak_lr" in header else "")
             + f", linear warm-up over {schedule.get('warmup_epochs')} epochs, then linear decay to 0"),
            ("training resolution (px)", f"{schedule.get('res_min')} -> {schedule.get('res_max')} (progressive, "
                                         f"ramp over {schedule.get('res_ramp_start')}-{schedule.get('res_ramp_end')} "
                                         f"of the run)"),
            ("validation", f"{val.get('res')} px centre crop, crop ratio {val.get('crop_ratio')}, flip-TTA "
                           f"{'on' if val.get('flip_tta') else 'off'}"),
            ("EMA of the weights", f"decay {ema.get('decay')}" if ema.get("enabled") else "off"),
            ("precision", run.get("precision")), ("seed", run.get("seed"))]
    return _table(rows) + "\nThe full resolved config is `config.yaml`, beside this card.\n"


def _data(manifest: dict | None, header: dict) -> str:
    if manifest is None:
        where = f" (`{header['data']}` is not readable here)" if "data" in header else ""
        return f"The shards' `manifest.json` was not found{where}: the training data is not described.\n"
    source = manifest.get("source") or {}
    src = str(source.get("path", "?"))
    splits = manifest.get("splits") or {}
    settings = manifest.get("settings") or {}
    counts = ", ".join(f"{info.get('images', '?'):,} {split}" if isinstance(info.get("images"), int) else split
                       for split, info in splits.items())
    return (f"WebDataset shards made by `python -m preprocess.shard` from a {source.get('format', '?')} source "
            f"(`{src.rstrip('/').rsplit('/', 1)[-1]}`): {manifest.get('num_classes')} classes, {counts} images; "
            f"each image re-encoded as JPEG quality {settings.get('quality')} with its longer side at most "
            f"{settings.get('max_side')} px.\n")


def card_body(card: dict, *, name: str, config: dict | None, header: dict, manifest: dict | None,
              records: list[dict], run: dict | None, figures: dict[str, str], formats=()) -> str:
    val = validation_set(card)
    blur = " with BlurPool" if card["blurpool"] else ""
    lines = [f"# {name}", "",
             f"An image classifier: {card['architecture']}{blur}, {card['num_classes']} classes, trained with "
             f"[{PROJECT}](#provenance) (`python -m train.main`) and exported by `python -m train.export --card`.", ""]
    warning = {"subset": f"> **Measured on part of ImageNet-1k's validation set**: {val['images']} of its "
                         f"{IMAGENET_VAL_IMAGES:,} images.",
               "other": f"> **Not an ImageNet-1k result.** The numbers below were measured on {val['name']}, the data "
                        f"of a small or synthetic run: they say nothing about accuracy on ImageNet-1k.",
               "unknown": f"> **Not known to be an ImageNet-1k result.** The file stores no class list, so the "
                          f"validation set ({val['images']} images) cannot be named."}.get(val["kind"])
    if warning:
        lines += [warning, ""]
    lines += ["## Results", ""]
    if card.get("top1") is not None:
        top5 = f"{100 * card['top5']:.2f} %" if card.get("top5") is not None and card["num_classes"] > 5 else "n/a"
        lines += ["| validation set | images | top-1 | top-5 | how |", "|---|---|---|---|---|",
                  f"| {val['name']} | {card.get('val_images')} | {100 * card['top1']:.2f} % | {top5} | the trainer's "
                  f"validation of exactly these ({card['weights']}) weights after epoch {card.get('epoch')}: "
                  f"{card['val_res']} px centre crop, crop ratio {card['crop_ratio']:g}, flip-TTA "
                  f"{'on' if card['flip_tta'] else 'off'} |", ""]
        scored = [r for r in records if r.get("top1") is not None]
        best = max(scored, key=lambda r: r["top1"]) if scored else None
        if best is not None and best.get("epoch") != card.get("epoch"):
            lines += [f"The best top-1 of the run was {100 * best['top1']:.2f} % after epoch {best['epoch']} "
                      f"(`checkpoints/best.pt` of the run); the weights here are those of epoch {card.get('epoch')}.",
                      ""]
    else:
        lines += ["These weights carry no measured accuracy (the trainer did not validate them).", ""]
    lines += ["## How to use", "",
              "With the [project's code](#provenance) (it builds the network as the card says, BlurPool included):", "",
              "```python", "import torch",
              'model = torch.hub.load("path/to/imagenet-rn50", "model", "model.safetensors", source="local")',
              "# or: from train.model import load_model; model = load_model(\"model.safetensors\")",
              'model.card["classes"][model(images).argmax(1)[0]]["name"]', "```", "",
              f"Input: RGB, shorter side resized to {card['val_res']} / {card['crop_ratio']:g} px, centre crop "
              f"{card['val_res']} px, scaled to [0, 1] and normalised with mean {card['mean']} and std {card['std']}"
              + ("; the measured numbers average the logits of each image and its mirror (flip-TTA)" if card["flip_tta"]
                 else "") + ". `config.json` holds these settings and the class list.", "",
              "`python -m viz.predict --checkpoint model.safetensors --data photos/ --output predictions.csv` gives "
              "each image's top-5; `python -m viz.validate --checkpoint model.safetensors --data VAL` measures "
              "top-1/top-5 on shards, an ImageFolder, ImageNet-V2 or with ImageNet-ReaL labels.", ""]
    if "onnx" in formats:
        lines += ["`model.onnx`: input `images` (N, 3, H, W) normalised as above, output `logits`; flip-TTA is not "
                  "inside it.", ""]
    if card["blurpool"]:
        lines += ["The weights load into a plain `torchvision.models." + card["architecture"] + "` without an "
                  "error, but that network has no BlurPool and computes another function: load them as above.", ""]
    lines += ["## Training recipe", "", _recipe(config, header), "## Data", "", _data(manifest, header)]
    if "curves" in figures:
        lines += ["## Training curves", "", f"![training curves]({figures['curves']})", ""]
    if "gradcam" in figures:
        lines += ["## The most confident mistakes", "",
                  f"![Grad-CAM of the most confident mistakes]({figures['gradcam']})", "",
                  "Each row: the crop the model saw | Grad-CAM of the predicted class | Grad-CAM of the true class "
                  "(`python -m viz.gradcam`).", ""]
    limits = []
    if val["kind"] == "other":
        limits.append(f"Trained and measured on a {card['num_classes']}-class set of {val['images']} validation "
                      f"images, not ImageNet-1k: a small or synthetic run (a demo or a test), not a model to use "
                      f"on photographs.")
    elif val["kind"] == "subset":
        limits.append(f"Measured on {val['images']} ImageNet-1k validation images, not all {IMAGENET_VAL_IMAGES:,}.")
    limits += [f"The classes are the {card['num_classes']} of its training set; anything else is forced into one "
               "of them.",
               "Flip-TTA is not part of the ONNX and torch.export files: add the logits of the mirrored image."]
    if val["imagenet"]:
        limits.append("ImageNet's images come with terms of access (non-commercial research and education); weights "
                      "trained on them may be bound by those terms.")
    lines += ["## Limitations", ""] + [f"- {line}" for line in limits] + [""]
    provenance = [f"- trained at commit `{card.get('commit')}` of {PROJECT}",
                  f"- written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"]
    if run and run.get("command"):
        provenance.insert(1, f"- trained with `{run['command']}` (state: {run.get('state')})")
    lines += ["## Provenance", ""] + provenance + [""]
    return "\n".join(lines)


def write_card(source: str | Path, out: Path, card: dict, config: dict | None, *, name: str | None = None,
               license: str = "other", curves: Path | None = None, gradcam: Path | None = None,
               formats=()) -> Path:
    """OUT/README.md (and config.yaml, curves.png, gradcam.png copied beside it) for the weights at `source`."""
    run_dir = run_folder(source)
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else None
    header = _config_header(config_text) if config_text else {}
    if config is None and config_text:
        loaded = yaml.safe_load(config_text)
        config = loaded if isinstance(loaded, dict) else None
    manifest = _read_json(Path(header["data"]) / "manifest.json") if "data" in header else None
    figures = {}
    for key, given, default in (("curves", curves, run_dir / "curves.png"), ("gradcam", gradcam,
                                                                             run_dir / "gradcam.png")):
        png = Path(given) if given else default
        if given and not png.is_file():
            raise ExportError(f"--{key} {png}: no such file")
        if png.is_file():
            shutil.copyfile(png, out / f"{key}.png")
            figures[key] = f"{key}.png"
    if config_text:
        (out / "config.yaml").write_text(config_text)
    name = name or f"{PROJECT}-{card['architecture']}-{run_dir.resolve().name}"
    meta = card_metadata(card, name=name, license=license, formats=formats)
    body = card_body(card, name=name, config=config, header=header, manifest=manifest, records=_records(run_dir),
                     run=_read_json(run_dir / "run.json"), figures=figures, formats=formats)
    path = out / CARD_NAME
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---\n\n{body}")
    os.replace(tmp, path)
    return path


class HubError(RuntimeError):
    pass


def push_to_hub(folder: Path, repo: str, *, private: bool = False) -> str:
    """Upload `folder` to the Hub model repo `repo` (created if missing); returns the commit's URL.
    The token is huggingface_hub's own (HF_TOKEN or `hf auth login`): never read or printed here."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", private=private or None, exist_ok=True)  # None: the Hub default
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                                 commit_message=f"{PROJECT}: upload {folder.name} (train.export --card)")
    except Exception as exc:  # network, auth and repo errors all end the same way: one line, no token in it
        raise HubError(f"--push-to-hub {repo}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                       f" (log in with `hf auth login` or set HF_TOKEN; HF_HUB_OFFLINE must be unset)") from exc
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}")


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m train.export",
                                description="Export a trained model: model.safetensors + config.json (its model card), "
                                            "ONNX (checked with onnxruntime) and a torch.export program.")
    p.add_argument("run_dir", help="a run folder (python -m train.main --out RUN_DIR) or one model file")
    p.add_argument("--out", "--output", dest="out", required=True, type=Path, help="folder to write the exported files into")
    p.add_argument("--format", default=",".join(FORMATS),
                   help=f"comma-separated, some of {','.join(FORMATS)} (default: all)")
    p.add_argument("--card", action="store_true",
                   help=f"also write {CARD_NAME}, a Hugging Face model card (metadata with the measured top-1/top-5 "
                        f"and the validation set they come from; recipe, data, figures, how to load, limitations)")
    p.add_argument("--name", default=None, help="the model's name in the card (default: the Hub repo, else "
                                                "imagenet-rn50-<arch>-<run folder>)")
    p.add_argument("--license", default="other",
                   help="the card's license id (default other: ImageNet's terms of access bind the weights)")
    p.add_argument("--curves", type=Path, default=None,
                   help="training curves PNG for the card (default RUN_DIR/curves.png when there is one; "
                        "python -m viz.plots RUN_DIR --output PNG draws it)")
    p.add_argument("--gradcam", type=Path, default=None,
                   help="Grad-CAM grid PNG for the card (default RUN_DIR/gradcam.png when there is one; "
                        "python -m viz.gradcam draws it)")
    p.add_argument("--push-to-hub", default=None, metavar="USER/NAME",
                   help="upload --out to this Hub model repo (implies --card; token from HF_TOKEN or hf auth login)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    args = p.parse_args(argv)
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    try:
        written = export(args.run_dir, args.out, formats)
        card = json.loads(written["config.json"].read_text())
        if args.card or args.push_to_hub:
            written["card"] = write_card(args.run_dir, args.out, card, None, name=args.name or args.push_to_hub,
                                         license=args.license, curves=args.curves, gradcam=args.gradcam,
                                         formats=formats)
    except ExportError as exc:
        print(f"train.export: error: {exc}", file=sys.stderr)
        return 2
    except OnnxMismatch as exc:
        print(f"train.export: error: {exc}", file=sys.stderr)
        return 3
    print(f"{card['architecture']} ({'BlurPool, ' if card['blurpool'] else ''}{card['num_classes']} classes, val "
          f"{card['val_res']} px, crop {card['crop_ratio']:g}, flip-TTA {'on' if card['flip_tta'] else 'off'}): "
          f"wrote {', '.join(str(p) for p in written.values())}")
    if args.push_to_hub:
        try:
            url = push_to_hub(args.out, args.push_to_hub, private=args.private)
        except HubError as exc:
            print(f"train.export: error: {exc}", file=sys.stderr)
            return 4
        print(f"uploaded {args.out} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
