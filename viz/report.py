"""`python -m viz.report RUN_DIR --data DIR`: where and why a trained model is weak, as one HTML page.

Evaluates the run's checkpoint (best.pt, else model_final.pth) on the validation data with the trainer's
own pipeline (viz.gradcam's evaluation: train.data's DALI loader + train.engine.eval_logits), saves the
predictions once (OUT/predictions.csv + .json; a later run with the same checkpoint file and settings reads
them instead of evaluating again) and writes OUT/report.html, one file with its pictures inlined (data: URIs):
top-1/top-5 and how they were measured, training curves, per-class accuracy (worst and best classes),
the most confused class pairs with example thumbnails, Grad-CAM rows (input | CAM of the predicted class |
CAM of the true class) for the most confident mistakes and for the worst classes, and the run's config and
timings. The page has no scripts and no links: it opens from disk, offline, and can be mailed alone. Paths
in it are relative to its folder, so that it names no folder of the machine that made it.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import html
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from preprocess.cli import ArgumentParser
from viz import evaluate as evaluation, loader, plots, render
from viz.cam import CAM_METHODS, cam_pairs
from viz.datasets import ValData, open_data
from viz.evaluate import Evaluation, Prediction, format_top5
from viz.gradcam import Setup, add_model_flags, check_numbers, match_labels, prepare, run_evaluation
from viz.select import ClassScore, Confusion, confused_pairs, per_class, select_mistakes
from viz.weights import VizError, describe

STRIP_SIDE = 160  # px, side of each cell of a Grad-CAM row
THUMB_SIDE = 96  # px, side of a confused-pair example
JPEG_QUALITY = 85  # photos and heatmaps inlined as JPEG: a PNG strip is ~5x the bytes


@dataclass(frozen=True)
class Findings:
    """What the page shows, computed from the predictions alone."""
    classes: list[ClassScore]  # worst first
    pairs: list[Confusion]
    confident: list[Prediction]  # the most confident mistakes
    worst: list[tuple[ClassScore, list[Prediction]]]  # the worst classes and their most confident mistakes
    taken_for: dict[int, tuple[int, int]]  # class -> (the class it is most often predicted as, images)


def find(predictions: list[Prediction], *, num_show: int, num_classes: int, num_pairs: int,
         per_worst_class: int = 2) -> Findings:
    classes = per_class(predictions)
    worst = [(score, select_mistakes(predictions, per_worst_class, class_index=score.index))
             for score in classes[:min(num_classes, (len(classes) + 1) // 2)] if score.correct < score.images]
    every_pair = confused_pairs(predictions, top=len(predictions), examples=0)
    taken_for: dict[int, tuple[int, int]] = {}
    for pair in every_pair:  # most first: the first pair of a class is its most common confusion
        taken_for.setdefault(pair.true, (pair.predicted, pair.count))
    return Findings(classes, confused_pairs(predictions, num_pairs), select_mistakes(predictions, num_show), worst,
                    taken_for)


# ----------------------------------------------------------------------------- pictures

def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def jpeg_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return data_uri(buffer.getvalue(), "image/jpeg")


@dataclass(frozen=True)
class Pictures:
    """The page's pictures as data: URIs (the page is one file)."""
    strips: dict[int, str]  # image index -> its Grad-CAM strip
    thumbs: dict[int, str]  # image index -> its thumbnail
    curves: str | None  # the training curves; None without a readable metrics.jsonl
    class_accuracy: str


def draw_pictures(setup: Setup, data: ValData, findings: Findings, *, method: str,
                  threads: int) -> tuple[dict[int, str], dict[int, str]]:
    """Grad-CAM strips of the selected mistakes and thumbnails of the confused pairs' examples, as
    ({image index: strip}, {image index: thumbnail}) of data: URIs. All CAMs are computed in one batched run."""
    shown = {p.index: p for p in findings.confident}
    for _, mistakes in findings.worst:
        shown.update((p.index, p) for p in mistakes)
    thumbs = {p.index for pair in findings.pairs for p in pair.examples}
    images = loader.fetch_images(data, sorted(set(shown) | thumbs), res=setup.res, crop_ratio=setup.crop_ratio,
                                 device="gpu" if setup.device.type == "cuda" else "cpu", num_threads=threads)
    thumb_uris = {index: jpeg_uri(render.thumbnail(Image.fromarray(loader.to_pixels(images[index])), THUMB_SIDE))
                  for index in sorted(thumbs & set(images))}
    order = [i for i in sorted(shown) if i in images]
    if not order:
        return {}, thumb_uris
    stacked = torch.stack([images[i] for i in order])
    model = setup.model
    cams_predicted, cams_true = cam_pairs(model, model.layer4[-1], stacked, [shown[i].predicted for i in order],
                                          [shown[i].label for i in order], method, batch_size=32)
    strips = {i: jpeg_uri(render.cam_strip(Image.fromarray(loader.to_pixels(images[i])), cp, ct, STRIP_SIDE))
              for i, cp, ct in zip(order, cams_predicted, cams_true)}
    return strips, thumb_uris


def png_uri(write) -> str:
    """What `write(file)` writes (a viz.plots figure: line art, smaller and sharper as PNG) as a data: URI."""
    buffer = io.BytesIO()
    write(buffer)
    return data_uri(buffer.getvalue(), "image/png")


# ----------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1100px;
padding:0 20px 60px;color:#1a1a1a;line-height:1.45}
h1{margin-top:28px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.big{font-size:28px;font-weight:600}.muted{color:#666}.wrong{color:#b01818}.right{color:#087030}
figure{margin:10px 0 18px}figcaption{font-size:14px;color:#333}img{max-width:100%}
.row{display:flex;gap:16px;flex-wrap:wrap}.thumbs img{margin-right:4px}
pre{background:#f7f7f7;padding:10px;overflow-x:auto;font-size:13px}
.bar{display:inline-block;height:10px;background:#4878a8;vertical-align:middle}
.cams{display:flex;flex-wrap:wrap;gap:0 28px}.cams figure{width:500px}
"""


def _e(text) -> str:
    return html.escape(str(text))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _shown(path, here: Path) -> str:
    """`path` relative to `here`, the page's folder: the page names no folder of the machine that made it."""
    try:
        return os.path.relpath(path, here)
    except ValueError:  # on another drive (Windows): no relative path
        return Path(path).name


ABSOLUTE = re.compile(r"(?<![\w.~:/-])/[^\s'\",\]}]+")  # a POSIX absolute path in config text


def _relative_paths(text: str, here: Path) -> str:
    return ABSOLUTE.sub(lambda m: _shown(m[0], here), text)


def _class_name(data: ValData, index: int) -> str:
    c = data.classes[index]
    return f"{c.name} ({c.wnid})" if c.wnid and c.wnid != c.name else c.name


def _summary(result: Evaluation, setup: Setup, data: ValData, checkpoint: Path, reused: bool, here: Path) -> str:
    s, loaded = result.summary(), setup.loaded
    info = loaded.info
    how = (f"Measured by <code>viz</code> on {plots.counted(s['images'], 'validation image')} of "
           f"<code>{_e(_shown(data.path, here))}</code> "
           f"({_e(data.layout)}{', ' + _e(data.note) if data.note else ''}) with the trainer's own validation "
           f"input (train.data's DALI pipeline: shorter side resized to res / crop ratio, centre crop) and scoring "
           f"(train.engine.eval_logits): {_e(describe(loaded))}, {_e(loaded.weights)} weights of "
           f"<code>{_e(_shown(checkpoint, here))}</code>; res {setup.res} px, crop ratio {setup.crop_ratio:g}, "
           f"flip TTA {'on' if setup.flip else 'off'}, precision {_e(result.meta.get('precision', '?'))}, batch "
           f"{setup.batch_size}, on {_e(result.meta.get('device', '?'))}.")
    if result.meta.get("limit"):
        how += f" Limited to the first {plots.counted(result.meta['limit'], 'image')} (--limit)."
    if s["skipped"]:
        how += f" {plots.counted(s['skipped'], 'unreadable image')} skipped."
    speed = (f"Evaluation took {s['seconds']:.1f} s ({s['images_per_s']:,.0f} images/s)" if s["images_per_s"]
             else "Evaluation time unknown")
    speed += " (read back from predictions.csv)." if reused else "."
    trainer = ""
    if "trainer_top1" in info:
        same = (info.get("trainer_images") == s["images"] and round(info["trainer_top1"] * s["images"])
                == s["correct"])
        verdict = ("<span class=right>the same count of correct images</span>" if same else
                   "<span class=wrong>different: other images or settings than the trainer's</span>")
        trainer = (f"<p>The trainer's own validation of these weights (epoch {_e(info.get('epoch'))}): top-1 "
                   f"{_pct(info['trainer_top1'])}, top-5 {_pct(info.get('trainer_top5'))} on "
                   f"{_e(info.get('trainer_images'))} images: {verdict}.</p>")
    elif "best_acc1" in info:
        trainer = (f"<p>The checkpoint reports best_acc1 {float(info['best_acc1']):.2f}% (epoch "
                   f"{_e(info.get('epoch'))}) from the trainer that wrote it.</p>")
    return (f"<section id=summary><h2>Accuracy</h2><div class=row><div><div class=big>{_pct(s['top1'])}</div>"
            f"<div class=muted>top-1 ({s['correct']:,} / {s['images']:,})</div></div><div><div class=big>"
            f"{_pct(s['top5'])}</div><div class=muted>top-5</div></div></div><p>{how}</p>{trainer}"
            f"<p class=muted>{speed} Predictions of every image (top-5 classes and probabilities): "
            f"<code>predictions.csv</code> beside this page. Paths are relative to this page's folder.</p></section>")


def _curves(curves: str | None, run_dir: Path, here: Path) -> str:
    body = (f"<figure><img src='{curves}' alt='training curves' width=1000><figcaption>Per epoch, "
            f"from <code>{_e(_shown(run_dir / plots.METRICS, here))}</code>.</figcaption></figure>" if curves else
            f"<p class=muted>No readable <code>{plots.METRICS}</code> in <code>{_e(_shown(run_dir, here))}</code>: "
            f"no curves.</p>")
    return f"<section id=curves><h2>Training curves</h2>{body}</section>"


def _class_table(data: ValData, scores: list[ClassScore], confusions: dict[int, tuple[int, int]]) -> str:
    rows = []
    for s in scores:
        common = confusions.get(s.index)
        wrong = (f"{_e(_class_name(data, common[0]))} ({common[1]})" if common else "")
        rows.append(f"<tr><td>{_e(_class_name(data, s.index))}</td><td class=num>{_pct(s.accuracy)} "
                    f"<span class=bar style='width:{round(60 * s.accuracy)}px'></span></td><td class=num>"
                    f"{_pct(s.top5)}</td><td class=num>{s.images}</td><td>{wrong}</td></tr>")
    return ("<table><tr><th>class</th><th>top-1</th><th>top-5</th><th>images</th><th>most often taken for "
            "(images)</th></tr>" + "".join(rows) + "</table>")


def _classes(data: ValData, findings: Findings, shown: int, chart: str) -> str:
    scores, top_confusion = findings.classes, findings.taken_for
    n = min(shown, (len(scores) + 1) // 2)  # few classes: half worst, half best, none listed twice
    best = list(reversed(scores[n:]))[:shown]
    return (f"<section id=classes><h2>Per-class accuracy</h2><figure><img src='{chart}' "
            f"alt='per-class top-1' width=1000><figcaption>Top-1 of each class with validation images "
            f"({plots.counted(len(scores), 'class', 'classes')}), worst to best.</figcaption></figure>"
            f"<h3>{'The worst class' if n == 1 else f'Worst {n} classes'}</h3>"
            f"{_class_table(data, scores[:n], top_confusion)}"
            + (f"<h3>{'The best class' if len(best) == 1 else f'Best {len(best)} classes'}</h3>"
               f"{_class_table(data, best, top_confusion)}" if best else "")
            + "</section>")


def _pairs(data: ValData, findings: Findings, thumbs: dict[int, str]) -> str:
    if not findings.pairs:
        return "<section id=confusions><h2>Most confused pairs</h2><p>No mistakes.</p></section>"
    rows = []
    for pair in findings.pairs:
        examples = "".join(f"<img src='{thumbs[p.index]}' width={THUMB_SIDE} height={THUMB_SIDE} alt='{_e(p.key)}' "
                           f"title='{_e(p.key)}: {100 * p.confidence:.1f}%'>"
                           for p in pair.examples if p.index in thumbs)
        rows.append(f"<tr><td class=right>{_e(_class_name(data, pair.true))}</td><td class=wrong>"
                    f"{_e(_class_name(data, pair.predicted))}</td><td class=num>{pair.count} / {pair.of} "
                    f"({100 * pair.count / pair.of:.0f}%)</td><td class=thumbs>{examples}</td></tr>")
    return ("<section id=confusions><h2>Most confused pairs</h2><p class=muted>Images of the true class predicted "
            "as the other, most first; examples most confident first.</p><table><tr><th>true class</th>"
            "<th>predicted as</th><th>images</th><th>examples</th></tr>" + "".join(rows) + "</table></section>")


def _cam_figure(data: ValData, p: Prediction, strips: dict[int, str], rank: str) -> str:
    if p.index not in strips:
        return ""
    return (f"<figure><img src='{strips[p.index]}' alt='Grad-CAM of {_e(p.key)}' "
            f"width={3 * STRIP_SIDE + 2 * render.PAD}><figcaption>{rank} <code>{_e(p.key)}</code>: true "
            f"<span class=right>{_e(_class_name(data, p.label))}</span> ({100 * p.true_prob:.1f}%), predicted "
            f"<span class=wrong>{_e(_class_name(data, p.predicted))}</span> ({100 * p.confidence:.1f}%)"
            f"</figcaption></figure>")


CAM_LEGEND = ("<p class=muted>Each row: the crop the model saw | Grad-CAM of the predicted class | Grad-CAM of "
              "the true class (red: the features that raised that class's score most).</p>")


def _mistakes(data: ValData, findings: Findings, strips: dict[int, str], method: str) -> str:
    rows = "".join(_cam_figure(data, p, strips, f"#{r}") for r, p in enumerate(findings.confident, 1))
    return (f"<section id=mistakes><h2>Most confident mistakes ({_e(method)})</h2>{CAM_LEGEND}"
            f"{f'<div class=cams>{rows}</div>' if rows else '<p>No mistakes.</p>'}</section>")


def _worst(data: ValData, findings: Findings, strips: dict[int, str]) -> str:
    parts = []
    for score, mistakes in findings.worst:
        figures = "".join(_cam_figure(data, p, strips, "") for p in mistakes)
        parts.append(f"<h3>{_e(_class_name(data, score.index))}: top-1 {_pct(score.accuracy)} of {score.images}"
                     f"</h3><div class=cams>{figures}</div>")
    return (f"<section id=worst-classes><h2>The worst classes, seen by Grad-CAM</h2>{CAM_LEGEND}"
            f"{''.join(parts) or '<p>Every class is right on every image.</p>'}</section>")


def _timings(run_dir: Path, records: list[dict]) -> list[tuple[str, str]]:
    if not records:
        return []
    seconds = sum(float(r.get("seconds") or 0) for r in records)
    last = records[-1]
    rows = [("epochs logged", str(len(records))), ("training time (sum of epochs, validation excluded)",
                                                     f"{seconds:,.1f} s ({seconds / 3600:.2f} h)")]
    if last.get("images_per_s"):
        rows.append(("training speed, last epoch", f"{float(last['images_per_s']):,.1f} images/s"))
    if "top1" in last:
        rows.append(("trainer's last validation", f"top-1 {_pct(last['top1'])}, top-5 {_pct(last.get('top5'))}"))
    return rows


def _config(run_dir: Path, setup: Setup, records: list[dict], result: Evaluation, build_seconds: float,
            here: Path) -> str:
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        text = config_file.read_text()
    elif setup.loaded.config:
        text = json.dumps(setup.loaded.config, indent=1)
    else:
        text = "(no config.yaml in the run folder and none in the checkpoint)"
    s = result.summary()
    rows = _timings(run_dir, records) + [
        ("evaluation for this report", f"{s['seconds']:.1f} s, {s['images_per_s'] or 0:,.0f} images/s on "
                                       f"{result.meta.get('device', '?')}"),
        ("report written", f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} in "
                           f"{build_seconds:.1f} s")]
    table = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return (f"<section id=config><h2>Config and timings</h2><table>{table}</table><h3>Config</h3>"
            f"<pre>{_e(_relative_paths(text, here))}</pre></section>")


def read_extra_results(paths) -> list[dict]:
    """Results files of `python -m viz.validate` (ImageNet-V2, ReaL, any other set), for --extra-results."""
    extra = []
    for path in paths:
        try:
            numbers = json.loads(Path(path).read_text())
        except OSError as exc:
            raise VizError(f"--extra-results {path}: cannot read ({exc.strerror or exc})") from exc
        except ValueError as exc:
            raise VizError(f"--extra-results {path}: not JSON ({exc})") from exc
        if not isinstance(numbers, dict) or numbers.get("tool") != "viz.validate":
            raise VizError(f"--extra-results {path}: not a results file of python -m viz.validate")
        extra.append(numbers)
    return extra


def _extra(extra: list[dict], here: Path) -> str:
    if not extra:
        return ""
    rows = "".join(
        f"<tr><td>{_e(n.get('dataset'))}</td><td class=num>{n.get('images', 0):,}</td><td class=num>"
        f"{_pct(n.get('top1'))}</td><td class=num>{_pct(n.get('top5'))}</td><td class=num>"
        f"{_pct(n['real_top1']) + ' (' + format(n['real_images'], ',') + ' images)' if 'real_top1' in n else ''}</td>"
        f"<td><code>{_e(_shown(n['checkpoint'], here) if n.get('checkpoint') else '?')}</code></td></tr>"
        for n in extra)
    return ("<section id=other-sets><h2>Other validation sets</h2><table><tr><th>data set</th><th>images</th>"
            "<th>top-1</th><th>top-5</th><th>ImageNet-ReaL top-1</th><th>model file</th></tr>" + rows + "</table>"
            "<p class=muted>Measured by <code>python -m viz.validate</code> (the same pipeline and settings as above); "
            "ReaL: a prediction is right when it is in the image's list of real labels, images without one left "
            "out.</p></section>")


def write_html(out: Path, *, run_dir: Path, checkpoint: Path, setup: Setup, data: ValData, result: Evaluation,
               findings: Findings, pictures: Pictures, records: list[dict], method: str, classes_shown: int,
               reused: bool, build_seconds: float, extra: list[dict] = ()) -> None:
    title = f"{run_dir.resolve().name}: what the model gets wrong"
    here = out.parent
    body = "".join([
        f"<h1>{_e(title)}</h1>",
        _summary(result, setup, data, checkpoint, reused, here),
        _extra(list(extra), here),
        _curves(pictures.curves, run_dir, here),
        _classes(data, findings, classes_shown, pictures.class_accuracy),
        _pairs(data, findings, pictures.thumbs),
        _mistakes(data, findings, pictures.strips, method),
        _worst(data, findings, pictures.strips),
        _config(run_dir, setup, records, result, build_seconds, here),
    ])
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'><link rel=icon href='data:,'>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)


# ----------------------------------------------------------------------------- the command

def default_checkpoint(run_dir: Path) -> Path:
    for candidate in (run_dir / "checkpoints" / "best.pt", run_dir / "model_final.pth",
                      run_dir / "checkpoints" / "last.pt"):
        if candidate.is_file():
            return candidate
    raise VizError(f"{run_dir}: no checkpoints/best.pt, model_final.pth or checkpoints/last.pt; pass --checkpoint")


def data_contents(data_arg: str) -> str:
    """A digest of what is at --data: its manifest.json (every shard's SHA-256 and the settings) for shards,
    else every file's relative path, size and mtime. Shards made again at the same path, or images changed
    in an ImageFolder, give another digest."""
    root = Path(data_arg)
    digest = hashlib.sha256()
    if (root / "manifest.json").is_file():
        digest.update((root / "manifest.json").read_bytes())
    elif root.is_dir():
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def fingerprint(checkpoint: Path, data_arg: str, setup: Setup, data: ValData | None = None) -> dict:
    """What predictions.csv depends on: a saved file is reused only when all of it is equal."""
    stat = checkpoint.stat()
    return {"checkpoint": str(checkpoint.resolve()), "checkpoint_bytes": stat.st_size,
            "checkpoint_mtime": stat.st_mtime, "data": str(Path(data_arg).resolve()),
            "data_contents": data_contents(data_arg), "weights": setup.loaded.weights,
            "blurpool": setup.loaded.blurpool,
            "label_map": list(data.label_map) if data is not None and data.label_map is not None else None}


def evaluate_or_reuse(path: Path, setup: Setup, data: ValData, stamp: dict, *, limit: int | None, threads: int,
                      progress: bool, fresh: bool) -> tuple[Evaluation, bool]:
    if not fresh and path.is_file() and evaluation.meta_path(path).is_file():
        saved = evaluation.load(path)
        settings = {"res": setup.res, "crop_ratio": setup.crop_ratio, "flip_tta": setup.flip,
                    "batch_size": setup.batch_size, "limit": limit, "device": str(setup.device),
                    "precision": evaluation.precision_name(setup.amp_dtype)}
        if all(saved.meta.get(k) == v for k, v in {**stamp, **settings}.items()):
            return saved, True
    result = run_evaluation(setup.model, data, res=setup.res, crop_ratio=setup.crop_ratio,
                            batch_size=setup.batch_size, limit=limit, threads=threads, flip=setup.flip,
                            amp_dtype=setup.amp_dtype, progress=progress, meta=stamp)
    evaluation.save(path, result)
    return result, False


def build(args: argparse.Namespace) -> Path:
    started = time.perf_counter()
    check_numbers(args)
    for flag, value in (("--num-show", args.num_show), ("--classes", args.classes), ("--pairs", args.pairs)):
        if value < 0:
            raise VizError(f"{flag} {value}: must be at least 0")
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise VizError(f"RUN_DIR {run_dir}: no such directory")
    extra = read_extra_results(args.extra_results)
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint(run_dir)
    out_dir = Path(args.output) if args.output else run_dir / "report"
    setup = prepare(str(checkpoint), num_classes=None, weights=args.weights, blurpool=args.blurpool,
                    flip_tta=args.flip_tta, device=args.device, precision=args.precision,
                    batch_size=args.batch_size, res=args.res, crop_ratio=args.crop_ratio)
    data = match_labels(setup, open_data(args.data), args.label_space, threads=args.num_threads)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VizError(f"--output {out_dir}: cannot create ({exc.strerror or exc})") from exc
    print(f"{describe(setup.loaded)} from {checkpoint}; {data.layout} data at {data.path}: {data.size} images")
    result, reused = evaluate_or_reuse(out_dir / "predictions.csv", setup, data,
                                       fingerprint(checkpoint, args.data, setup, data), limit=args.limit,
                                       threads=args.num_threads, progress=not args.no_progress, fresh=args.fresh)
    print(("read back" if reused else "evaluated") + f": top-1 {result.top1:.2%}, top-5 "
          f"{format_top5(result.top5)} on {len(result.predictions)} images")
    findings = find(result.predictions, num_show=args.num_show, num_classes=args.classes, num_pairs=args.pairs)
    strips, thumbs = draw_pictures(setup, data, findings, method=args.method, threads=args.num_threads)
    records = []
    if (run_dir / plots.METRICS).is_file():
        try:
            records = plots.read_metrics(run_dir / plots.METRICS)
        except plots.PlotError as exc:
            print(f"viz.report: note: no curves ({exc})", file=sys.stderr)
    curves = png_uri(lambda f: plots.plot_curves(records, f, plots.curves_title(run_dir, records),
                                                 who="viz.report")) if records else None
    chart = png_uri(lambda f: plots.plot_class_accuracy(
        [data.classes[s.index].name for s in findings.classes], [s.accuracy for s in findings.classes], f,
        f"per-class top-1 on {plots.counted(len(result.predictions), 'image')}", who="viz.report"))
    out = out_dir / "report.html"
    write_html(out, run_dir=run_dir, checkpoint=checkpoint, setup=setup, data=data, result=result, findings=findings,
               pictures=Pictures(strips, thumbs, curves, chart), records=records, method=args.method,
               classes_shown=args.classes, reused=reused, build_seconds=time.perf_counter() - started, extra=extra)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m viz.report",
        description="Evaluate a training run's checkpoint on validation data (the trainer's own pipeline) and write "
                    "one HTML file with its pictures inlined (OUT/report.html; predictions.csv beside it): "
                    "top-1/top-5 and how they were measured, training curves, per-class accuracy, the most "
                    "confused class pairs, Grad-CAM rows of the most confident mistakes and of the worst classes, "
                    "config and timings. Opens from disk, offline; paths in it are relative to its folder.")
    p.add_argument("run_dir", help="a training run folder (python -m train.main --out RUN_DIR)")
    p.add_argument("--data", required=True,
                   help="validation data: shards folder (manifest.json + val/*.tar), ImageFolder or a Tiny-ImageNet "
                        "val folder")
    p.add_argument("--checkpoint", default=None,
                   help="weights to evaluate (default RUN_DIR/checkpoints/best.pt, else RUN_DIR/model_final.pth)")
    p.add_argument("--output", "--out", dest="output", default=None,
                   help="folder for report.html and predictions.csv (+ .json) (default RUN_DIR/report)")
    p.add_argument("--num-show", type=int, default=12, help="most confident mistakes shown with Grad-CAM (default 12)")
    p.add_argument("--classes", type=int, default=8,
                   help="worst (and best) classes listed; the worst also get Grad-CAM rows (default 8)")
    p.add_argument("--pairs", type=int, default=10, help="most confused class pairs listed (default 10)")
    p.add_argument("--method", default="gradcam", choices=list(CAM_METHODS), help="CAM method (default gradcam)")
    p.add_argument("--extra-results", nargs="+", default=[], metavar="FILE",
                   help="results JSON of python -m viz.validate (ImageNet-V2, ImageNet-ReaL, ...): shown in a small "
                        "table under the accuracy")
    add_model_flags(p)
    p.add_argument("--num-threads", type=int, default=min(8, max(1, (os.cpu_count() or 1) - 1)),
                   help="DALI decoding threads (default: cores - 1, at most 8)")
    p.add_argument("--fresh", action="store_true",
                   help="evaluate again even if OUT/predictions.csv was made from the same checkpoint and settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = build(args)
    except VizError as exc:
        print(f"viz.report: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("viz.report: interrupted", file=sys.stderr)
        return 130
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, pictures inlined; open it in a browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
