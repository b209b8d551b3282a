"""The tuner on a text-to-image family: PixArt-alpha's own pipeline, prompts encoded by its own text encoder.

A tiny random PixArt-alpha pipeline folder (transformer, VAE, DPM-Solver++, a one-layer T5 encoder and a
word-level tokenizer made in the test) is saved and tuned with the cache method: 2 buckets, 6 steps,
2 calibration and 2 held-out seeds. The figures the tuner reports are recomputed here by generating
through ``PixArtAlphaPipeline`` with the written plan as ``pipe.transformer``. Latencies are fixed (a full
forward 4 ms, a cached one 1 ms): on a tiny model on shared cores the timing is noise, and speed is not what
this module tests (tests/export/test_tune.py times the bundled model).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.quality import psnr
from export.report_quality import unmerged_view
from export.tune import HELDOUT_SEED, tune_plan
from passes.errors import DitmergeError
from runtime.plan import Plan
from runtime.transformer import PlanTransformer

WORDS = "a photo of the red blue cat dog car tree house at night".split()
PROMPTS = ["a red cat", "the blue car at night"]
SMALL = dict(method="cache", buckets=2, samples=2, steps=6, repeats=3, levels={"interval": (1, 2, 3)},
             prompts=PROMPTS, keep_work=True, check_fidelity=False, progress=False)
TARGET_DB = 68.5  # the tiny random model changes its images little: 68.9 dB at interval 2, 68.0 at 3


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _pipeline(text: bool = True):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from tests.pipelines.components import tiny_vae

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                           num_layers=4, sample_size=32, patch_size=4, cross_attention_dim=64,
                                           caption_channels=32, norm_type="ada_norm_single",
                                           num_embeds_ada_norm=1000).eval()
    encoder = T5EncoderModel(T5Config(vocab_size=len(WORDS) + 3, d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                      num_heads=2)).eval() if text else None
    return PixArtAlphaPipeline(tokenizer=_tokenizer() if text else None, text_encoder=encoder, vae=tiny_vae(blocks=4),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())


def _fixed_latency(calls: dict, repeats: int = 20, warmup: int = 2) -> dict[str, float]:
    """Seconds per call: cached forwards 1 ms, full ones 4 ms, a generation ("ref", "tuned") 6 steps of 6 ms."""
    return {k: 36e-3 if k in ("ref", "tuned") else 1e-3 if k.endswith("|cached") else 4e-3 for k in calls}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune_text")
    _pipeline().save_pretrained(root / "pixart")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("export.tune_eval.interleaved_latency", _fixed_latency)
        manifest = tune_plan(model=str(root / "pixart"), out=root / "p", target_psnr=TARGET_DB,
                             work_dir=root / "work", **SMALL)
    return root, manifest


def _generate(pipe, plan: Plan, seeds: list[int]) -> np.ndarray:
    """Through the saved pipeline with the plan as its transformer, prompts round-robin, as np images."""
    pipe.transformer = PlanTransformer(plan, backend="cpu")
    out = [pipe(prompt=PROMPTS[i % len(PROMPTS)], num_inference_steps=6, output_type="np", clean_caption=False,
                generator=torch.Generator().manual_seed(s)).images for i, s in enumerate(seeds)]
    return np.concatenate(out).transpose(0, 3, 1, 2) * 2 - 1  # [-1, 1] NCHW, as export.quality takes them


def test_the_chosen_plan_meets_the_target_through_the_real_pipeline(tuned):
    root, manifest = tuned
    t = manifest["report"]["tune"]
    assert t["sampler"] == "PixArtAlphaPipeline with DPMSolverMultistepScheduler"
    assert t["calibration"]["guidance"] == 4.5  # the pipeline's default
    assert t["calibration"]["psnr_db"]["mean"] >= TARGET_DB
    assert np.isfinite(t["heldout"]["psnr_db"]["mean"]) and t["heldout"]["seeds"] == [HELDOUT_SEED, HELDOUT_SEED + 1]
    rows = t["table"]
    assert all(r["meets_target"] == (r["quality"]["psnr_db"]["mean"] >= TARGET_DB) for r in rows)
    assert any(not r["meets_target"] for r in rows), "the search never went past the target"
    assert t["predicted_speedup"] == max(r["predicted_speedup"] for r in rows if r["meets_target"]) > 1.0
    plan = Plan.load(root / "p")
    assert max(b.meta["interval"] for b in plan.buckets) > 1
    # the tuner's calibration and held-out figures, recomputed through the user's pipeline with prompts as text
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(root / "pixart")
    pipe.set_progress_bar_config(disable=True)
    for seeds, key in (([0, 1], "calibration"), ([HELDOUT_SEED, HELDOUT_SEED + 1], "heldout")):
        got = psnr(_generate(pipe, plan, seeds), _generate(pipe, unmerged_view(plan), seeds))
        assert got.mean() == pytest.approx(t[key]["psnr_db"]["mean"], abs=1e-2), key  # dB
    assert "## Tuned to a quality budget" in (root / "p" / "report.md").read_text()


def test_an_impossible_target_says_the_unmerged_plan_is_the_answer(tuned):
    root, _ = tuned
    with pytest.raises(DitmergeError, match="unmerged plan is the answer"):
        tune_plan(model=str(root / "pixart"), out=root / "p200", target_psnr=200, work_dir=root / "work", **SMALL)
    assert not (root / "p200" / "plan.json").exists()


def test_without_text_encoders_prompt_embeddings_stand_in(tuned, tmp_path):
    """A folder without text encoders: a clear error naming the flag; the prompts' embeddings, saved, give the
    images the encoded prompts give."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    from export.tune_samplers import make_sampler

    root, _ = tuned
    full = DiffusionPipeline.from_pretrained(root / "pixart")
    enc = [full.encode_prompt(p, do_classifier_free_guidance=True) for p in PROMPTS]
    names = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
    save_file({n: torch.cat([e[i] for e in enc]).contiguous() for i, n in enumerate(names)}, tmp_path / "e.safetensors")
    save_file({"prompt_embeds": enc[0][0].contiguous()}, tmp_path / "partial.safetensors")
    full.text_encoder = full.tokenizer = None
    full.save_pretrained(tmp_path / "bare")
    built = Plan.load(root / "work" / "plan")
    manifest = {**built.manifest, "model": {**built.model, "source": str(tmp_path / "bare")}}
    with pytest.raises(DitmergeError, match="has no text_encoder, tokenizer.*--prompt-embeds FILE"):
        make_sampler(manifest, None, None, None, steps=3, guidance=None)
    with pytest.raises(DitmergeError, match="lacks prompt_attention_mask, negative_prompt_embeds"):
        make_sampler(manifest, None, None, tmp_path / "partial.safetensors", steps=3, guidance=None)
    from_embeds = make_sampler(manifest, None, None, tmp_path / "e.safetensors", steps=3, guidance=None)
    from_text = make_sampler(built.manifest, None, PROMPTS, None, steps=3, guidance=None)
    tf = PlanTransformer(built, backend="cpu")
    jobs = from_text.jobs(2, 5)
    assert jobs == from_embeds.jobs(2, 5) == [(0, 5), (1, 6)]
    a, b = from_embeds.images(tf, jobs), from_text.images(tf, jobs)
    assert a.shape == (2, 3, 256, 256) and -1 <= a.min() and a.max() <= 1
    np.testing.assert_allclose(a, b, atol=1e-4)  # the same embeddings, up to float rounding of their encoding
    assert float(np.abs(a[0] - a[1]).max()) > 1e-3  # two prompts and seeds: two images


def test_text_models_refuse_fid_targets_and_class_labels(tuned, tmp_path):
    root, _ = tuned
    with pytest.raises(DitmergeError, match="for a text-to-image model give target_psnr"):
        tune_plan(model=str(root / "pixart"), out=tmp_path / "p", target_fid_increase=0.05, work_dir=root / "work",
                  **SMALL)
    with pytest.raises(DitmergeError, match="takes prompts, not class labels"):
        tune_plan(model=str(root / "pixart"), out=tmp_path / "p", target_psnr=TARGET_DB, work_dir=root / "work",
                  classes=[1], **SMALL)


def test_prompts_come_from_a_file_and_the_cli_passes_them(tuned, tmp_path, capsys):
    from export.__main__ import main
    from export.tune_samplers import make_sampler

    root, _ = tuned
    (tmp_path / "prompts.txt").write_text("a red cat\n\n  the blue car at night  \n")
    sampler = make_sampler(Plan.load(root / "work" / "plan").manifest, None, tmp_path / "prompts.txt", None, 3, None)
    assert sampler.key()["prompts"] == ["a red cat", "the blue car at night"] and len(sampler.embeds) == 2
    with pytest.raises(DitmergeError, match="no such file"):
        make_sampler(Plan.load(root / "work" / "plan").manifest, None, tmp_path / "none.txt", None, 3, None)
    assert main(["--model", str(root / "pixart"), "--target-psnr", "30", "--prompts", "p.txt", "--prompt-embeds",
                 "e.safetensors", "--print-python"]) == 0
    out = capsys.readouterr().out
    assert "prompts='p.txt'" in out and "prompt_embeds='e.safetensors'" in out
