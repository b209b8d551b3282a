"""Quality and end-to-end speed of a merged plan against the unmerged plan (docs/design.md, 'The plan').

Seeded generations run through both plans with the same noise: PSNR/SSIM per image, and for the
bundled model the classifier's accuracy by conditioning class and the classifier-FID against held-out
real crops. End-to-end latency is measured interleaved, medians, in one process.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np

from export.measure import interleaved_latency
from export.quality import frechet_distance, psnr, ssim, summarize
from runtime.generate import sample_classes
from runtime.plan import Plan
from runtime.transformer import PlanTransformer

logger = logging.getLogger(__name__)


def unmerged_view(plan: Plan) -> Plan:
    """The same plan with every bucket on the unmerged graph: the reference for quality and speed."""
    manifest = copy.deepcopy(plan.manifest)
    for b in manifest["buckets"]:
        b["graph"], b["sha256"] = manifest["base"]["graph"], manifest["base"]["sha256"]
        b["graphs"] = {"main": {"file": b["graph"], "sha256": b["sha256"]}}
        b["counts"] = {}
        b["method_meta"] = {}
    manifest["method"] = {"name": "none", "params": {}}
    return Plan(plan.dir, manifest)


def measure_quality(plan: Plan, samples: int = 50, steps: int = 50, guidance: float = 4.0, latency_repeats: int = 3,
                    grid_png: Path | None = None, progress: bool = False, classifier: bool | None = None) -> dict:
    """Generate ``samples`` images (classes round-robin) through the unmerged and the merged plan.

    ``classifier``: score with the bundled crop classifier (FID, class accuracy); None: only for the bundled
    model itself, True: also for a model fine-tuned from it (e.g. by ``export.train_mod``).
    """
    return compare_plans({"merged": plan}, unmerged_view(plan), samples, steps, guidance, latency_repeats,
                         grid_png, progress, classifier)["merged"]


def compare_plans(plans: dict[str, Plan], reference: Plan, samples: int = 50, steps: int = 50,
                  guidance: float = 4.0, latency_repeats: int = 3, grid_png: Path | None = None,
                  progress: bool = False, classifier: bool | None = None) -> dict[str, dict]:
    """Each plan against one reference plan: same noise, same labels, one interleaved timing loop.

    Methods that change the model (MoD fine-tunes it) are compared with the model users started from by
    passing that model's unmerged plan as ``reference``. Returns a report per plan, keyed as ``plans``,
    with the reference's figures under the ``unmerged`` keys; ``grid_png`` shows the first plan.
    """
    ref_tf = PlanTransformer(reference, backend="cpu")
    tfs = {name: PlanTransformer(p, backend="cpu") for name, p in plans.items()}
    num_classes = ref_tf.config.num_embeds_ada_norm
    labels = np.arange(samples) % num_classes
    sched = reference.model.get("scheduler")
    gen = lambda tf: sample_classes(tf, labels, steps=steps, guidance=guidance, seed=0,
                                    scheduler_config=sched, progress=progress)
    ref = gen(ref_tf)
    images = {name: gen(tf) for name, tf in tfs.items()}
    reports = {}
    for name, imgs in images.items():
        p, s = psnr(imgs, ref), ssim(imgs, ref)
        reports[name] = {"samples": samples, "steps": steps, "guidance": guidance, "psnr_db": summarize(p, "min"),
                         "ssim": summarize(s, "min")}

    first = next(iter(plans.values()))
    clf = _bundled_classifier(first, any_source=bool(classifier)) if classifier is not False else None
    if clf is not None:
        from export.classifier import predict
        from export.photos import heldout

        real_x, _ = heldout()
        _, real_f = predict(clf, real_x)
        scores = {}
        for name, imgs in (("unmerged", ref), *images.items()):
            pred, feats = predict(clf, imgs)
            scores[name] = (float((pred == labels).mean()), frechet_distance(feats, real_f))
        for name, report in reports.items():
            report["class_accuracy_unmerged"], report["fid_unmerged"] = scores["unmerged"]
            report["class_accuracy_merged"], report["fid_merged"] = scores[name]
            report["fid_real_samples"] = len(real_x)

    one = np.array([0])
    run = lambda tf: lambda: sample_classes(tf, one, steps=steps, guidance=guidance,
                                            scheduler_config=sched, progress=False)
    calls = {" reference": run(ref_tf), **{name: run(tf) for name, tf in tfs.items()}}
    lat = interleaved_latency(calls, repeats=latency_repeats, warmup=1)
    for name, report in reports.items():
        report["e2e_latency_s"] = {"unmerged": lat[" reference"], "merged": lat[name]}
        report["e2e_speedup"] = lat[" reference"] / lat[name]
    if grid_png is not None:
        write_grid(grid_png, ref[:num_classes], images[next(iter(plans))][:num_classes])
    return reports


def _bundled_classifier(plan: Plan, any_source: bool = False):
    from export.classifier import CLASSIFIER_FILE, load_classifier
    from export.photos import CLASSES

    cfg = plan.model["config"]
    if (cfg.get("in_channels") != 3 or cfg.get("num_embeds_ada_norm") != len(CLASSES)
            or not (any_source or plan.model["source"].startswith("bundled:")) or not CLASSIFIER_FILE.is_file()):
        return None
    return load_classifier()


def write_grid(path: Path, top: np.ndarray, bottom: np.ndarray, scale: int = 4) -> None:
    """Two rows of images (unmerged above, merged below), upscaled by ``scale``, as a PNG."""
    from PIL import Image

    from export.photos import to_uint8

    rows = [np.concatenate(list(to_uint8(r)), axis=1) for r in (top, bottom)]
    img = np.concatenate(rows, axis=0).repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(img).save(path)
