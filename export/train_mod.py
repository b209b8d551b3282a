"""Fine-tune a diffusers DiT with DiffRatio-MoD routers and learnable layer- and timestep-wise ratios.

``python -m export.train_mod --out DIR`` fine-tunes the bundled model (or ``--model``) on the crops it was
trained on, with a router per block and one learnable compression ratio per layer per timestep region
(:mod:`passes.mod.eager`). Loss: diffusion loss + lambda * (mean ratio - target)^2 (DiffCR §3.3). Writes
DIR as a diffusers model folder (LoRA merged into the weights) with ``mod_routers.safetensors`` and
``mod_ratios.json`` beside the weights; ``python -m export --model DIR --method mod`` builds its plan.
Resumable: the training state lives in DIR and a rerun with more ``--steps`` continues it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from export.load import BUNDLED, load_transformer, scheduler_config
from export.photos import CropSampler
from export.train import make_scheduler
from passes.cli import run_cli
from passes.errors import DitmergeError
from passes.mod.eager import BIN, MoDRouting, region_bounds

logger = logging.getLogger(__name__)

ROUTERS_FILE = "mod_routers.safetensors"
RATIOS_FILE = "mod_ratios.json"
STATE_FILE = "mod_train_state.pt"
LAMBDA_GROWTH = 1.05  # per step, while the mean ratio is off target by more than LAMBDA_TOL
LAMBDA_TOL = 0.02


class LoRA(torch.nn.Module):
    """Low-rank updates of the block Linears, added by forward hooks so the model's state dict keeps its keys."""

    def __init__(self, model: torch.nn.Module, rank: int, alpha: float | None = None, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.targets = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                        and name.startswith("transformer_blocks.") and ".norm1.emb." not in name}
        self.scale = (alpha or rank) / rank
        self.down = torch.nn.ParameterDict()
        self.up = torch.nn.ParameterDict()
        for name, m in self.targets.items():
            key = name.replace(".", "__")
            self.down[key] = torch.nn.Parameter(torch.randn(rank, m.in_features, generator=gen) / m.in_features**0.5)
            self.up[key] = torch.nn.Parameter(torch.zeros(m.out_features, rank))
        self._handles = [m.register_forward_hook(self._hook(name.replace(".", "__"))) for name, m in self.targets.items()]

    def _hook(self, key: str):
        def hook(_module, args, output):
            return output + self.scale * torch.nn.functional.linear(
                torch.nn.functional.linear(args[0], self.down[key]), self.up[key])
        return hook


def merged_copy(net: torch.nn.Module, lora: LoRA | None) -> torch.nn.Module:
    """A copy of ``net`` with the LoRA updates merged into its weights (W += scale * up @ down) and no hooks."""
    import copy

    net = copy.deepcopy(net)  # the live model keeps its LoRA for a resumed run
    for m in net.modules():
        m._forward_hooks.clear()  # the copied LoRA hooks
    if lora is not None:
        with torch.no_grad():
            for name in lora.targets:
                key = name.replace(".", "__")
                net.get_submodule(name).weight += lora.scale * lora.up[key] @ lora.down[key]
    return net


def fine_tune(out: Path, model: str = BUNDLED, steps: int = 300, target: float = 0.25, lam: float = 0.3,
              regions: int = 10, lora_rank: int = 8, full: bool = False, batch: int = 32, lr: float | None = None,
              router_lr: float = 1e-3, ratio_lr: float = 5e-3, max_ratio: float = 0.7, label_dropout: float = 0.1,
              distill: float = 1.0, seed: int = 0, log_every: int = 25, save_every: int = 50, threads: int = 0,
              progress: bool = True) -> dict:
    """Fine-tune (or resume) and write the model, routers and learned ratios to ``out``; returns the ratios record.

    Args:
        out: the output diffusers folder (created; the bundled model itself is never written).
        model: the model to start from (``bundled:tiny-dit`` or a diffusers folder).
        steps: total optimizer steps (a resumed run continues up to this count).
        target: target mean compression ratio (share of tokens that skip a block; DiffCR: 20-30 %).
        lam: starting weight of the ratio loss; raised by 5 % a step while the mean ratio is more than
            0.02 off target and relaxed back towards ``lam`` once on target (DiffCR adjusts it dynamically).
        regions: timestep regions, each with its own ratio per layer (DiffCR recommends 4-10).
        lora_rank: rank of the LoRA updates of the block Linears (ignored with ``full``).
        full: fine-tune every weight of the model instead of LoRA.
        lr: learning rate of the model weights (default 1e-3 for LoRA, 1e-4 for full fine-tuning).
        router_lr: learning rate of the routers.
        ratio_lr: learning rate of the ratios.
        max_ratio: the largest compression ratio a layer may learn.
        distill: weight of an added loss ``mse(routed prediction, starting model's prediction)`` on the same
            noisy input; 0 is DiffCR's loss. On a CPU budget the diffusion loss alone lets the model drift from
            the one users had (the unrouted FID went from 556 to 867 in 15 minutes); the teacher term keeps
            the routed model close to it.
    """
    if not 0 <= target <= max_ratio:
        raise DitmergeError(f"--target {target} must lie in [0, max ratio {max_ratio}]")
    if distill < 0:
        raise DitmergeError(f"--distill {distill} must be >= 0")
    if regions < 1 or steps < 1 or batch < 1:
        raise DitmergeError("--regions, --steps and --batch must be positive")
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    torch.manual_seed(seed)
    net = load_transformer(model)
    for m in net.modules():  # label dropout happens in the loop, as in export.train
        if hasattr(m, "dropout_prob"):
            m.dropout_prob = 0.0
    cfg = net.config
    if cfg.num_embeds_ada_norm is None or cfg.in_channels != 3:
        raise DitmergeError("train_mod fine-tunes class-conditional pixel-space DiTs on the bundled photo crops; "
                            f"{model} has in_channels={cfg.in_channels}, classes={cfg.num_embeds_ada_norm}")
    tokens = (cfg.sample_size // cfg.patch_size) ** 2
    channels = cfg.num_attention_heads * cfg.attention_head_dim
    routing = MoDRouting(channels, cfg.num_layers, regions, max_ratio=max_ratio, seed=seed)
    teacher = None
    if distill > 0:  # the starting model, frozen, unrouted, before LoRA hooks are added
        import copy

        teacher = copy.deepcopy(net).eval().requires_grad_(False)
    lora = None if full else LoRA(net, lora_rank, seed=seed)
    net.requires_grad_(full)
    weights = list(net.parameters()) if full else list(lora.parameters())
    opt = torch.optim.AdamW([
        {"params": weights, "lr": lr or (1e-4 if full else 1e-3), "weight_decay": 0.0},
        {"params": list(routing.routers.parameters()), "lr": router_lr, "weight_decay": 0.0},
        {"params": [routing.ratios], "lr": ratio_lr, "weight_decay": 0.0}])
    sched = make_scheduler()
    t_total = sched.config.num_train_timesteps
    routing.num_train_timesteps = t_total
    state_path = out / STATE_FILE
    step, elapsed, log, lam_now = 0, 0.0, [], lam
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["args"] != _args(model, target, lam, regions, lora_rank, full, batch, max_ratio, seed, distill):
            raise DitmergeError(f"{state_path} is from a run with other settings ({state['args']}); "
                                "use another --out or delete it")
        net.load_state_dict(state["model"]) if full else lora.load_state_dict(state["lora"])
        routing.load_state_dict(state["routing"])
        opt.load_state_dict(state["opt"])
        step, elapsed, log, lam_now = state["step"], state["elapsed"], state["log"], state["lambda"]
        logger.info("resumed from %s at step %d", state_path, step)
    sampler = CropSampler(seed + 7919 + step)
    gen = torch.Generator().manual_seed(seed * 1000 + 17 + step)
    alphas = sched.alphas_cumprod
    null = cfg.num_embeds_ada_norm  # the label embedding's extra row: the unconditional class
    net.train()
    routing.train()
    t0 = time.perf_counter() - elapsed
    window: list[tuple[float, float]] = []
    bar = tqdm(total=steps, initial=step, desc="mod fine-tuning", unit="step", disable=not progress)
    with routing.installed(net):
        while step < steps:
            # one timestep region per step (every sample routes at the same k); regions cycle in a seeded order
            order = np.random.default_rng(seed + step // regions).permutation(regions)
            region = int(order[step % regions])
            t_lo, t_hi = region_bounds(region, regions, t_total)
            x0, labels = sampler.sample(batch)
            x0, labels = torch.from_numpy(x0), torch.from_numpy(labels)
            labels = torch.where(torch.rand(batch, generator=gen) < label_dropout, null, labels)
            t = torch.randint(t_lo, t_hi + 1, (batch,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            routing.region = region
            pred = net(xt, timestep=t, class_labels=labels).sample[:, :x0.shape[1]]
            diff = torch.nn.functional.mse_loss(pred, noise)
            mean_ratio = routing.mean_ratio()
            loss = diff + lam_now * (mean_ratio - target) ** 2
            gap = torch.zeros(())
            if teacher is not None:
                with torch.no_grad():
                    want = teacher(xt, timestep=t, class_labels=labels).sample[:, :x0.shape[1]]
                gap = torch.nn.functional.mse_loss(pred, want)
                loss = loss + distill * gap
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(weights + list(routing.routers.parameters()), 1.0)
            opt.step()
            routing.clamp_()
            off = abs(float(routing.mean_ratio().detach()) - target)
            lam_now = lam_now * LAMBDA_GROWTH if off > LAMBDA_TOL else max(lam, lam_now / LAMBDA_GROWTH)
            step += 1
            window.append((float(diff.detach()), float(loss.detach()), float(gap.detach())))
            bar.update()
            bar.set_postfix(loss=f"{float(diff.detach()):.4f}", ratio=f"{float(routing.mean_ratio().detach()):.3f}", lam=f"{lam_now:.2g}")
            if step % log_every == 0 or step == steps:
                spent = time.perf_counter() - t0
                entry = {"step": step, "diffusion_loss": float(np.mean([w[0] for w in window])),
                         "loss": float(np.mean([w[1] for w in window])), "teacher_gap": float(np.mean([w[2] for w in window])),
                         "mean_ratio": float(routing.mean_ratio().detach()),
                         "lambda": lam_now, "minutes": spent / 60}
                log.append(entry)
                window = []
                logger.info("step %d/%d  diffusion loss %.4f  teacher gap %.4f  mean ratio %.3f (target %.2f)  "
                            "lambda %.3g  %.2f s/step", step, steps, entry["diffusion_loss"], entry["teacher_gap"],
                            entry["mean_ratio"], target, lam_now, spent / step)
            if step % save_every == 0 and step < steps:
                _save_state(state_path, net, lora, routing, opt, step, time.perf_counter() - t0, log, lam_now,
                            _args(model, target, lam, regions, lora_rank, full, batch, max_ratio, seed, distill))
    bar.close()
    elapsed = time.perf_counter() - t0
    args = _args(model, target, lam, regions, lora_rank, full, batch, max_ratio, seed, distill)
    _save_state(state_path, net, lora, routing, opt, step, elapsed, log, lam_now, args)
    record = _write_model(out, model, net, lora, routing, tokens, args, step, elapsed, log)
    logger.info("wrote %s: %d steps in %.1f min, mean learned ratio %.3f (snapped %.3f)", out, step, elapsed / 60,
                record["mean_learned"], record["mean_snapped"])
    return record


def _args(model, target, lam, regions, lora_rank, full, batch, max_ratio, seed, distill) -> dict:
    return {"model": model, "target": target, "lambda": lam, "regions": regions,
            "finetune": "full" if full else f"lora rank {lora_rank}", "batch": batch, "max_ratio": max_ratio,
            "seed": seed, "distill": distill}


def _save_state(path: Path, net, lora, routing, opt, step, elapsed, log, lam_now, args) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": net.state_dict() if lora is None else None, "lora": lora.state_dict() if lora else None,
                "routing": routing.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                "log": log, "lambda": lam_now, "args": args}, tmp)
    tmp.replace(path)


def _write_model(out: Path, model: str, net, lora, routing: MoDRouting, tokens: int, args: dict, step: int,
                 elapsed: float, log: list) -> dict:
    """The fine-tuned model as a diffusers folder (LoRA merged), routers and ratios beside it."""
    from safetensors.torch import save_file

    net = merged_copy(net, lora)
    net.eval()
    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out, safe_serialization=True)
    sched_cfg = scheduler_config(model)
    (out / "scheduler").mkdir(exist_ok=True)
    if sched_cfg is not None:
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg, indent=2))
    else:
        make_scheduler().save_pretrained(out / "scheduler")
    save_file(routing.router_tensors(), out / ROUTERS_FILE)
    learned = [[round(float(v), 4) for v in row] for row in routing.ratios.detach()]
    snapped = routing.snapped()
    record = {
        "format": 1,
        "method": "DiffRatio-MoD (DiffCR)",
        "ratio": "compression ratio: the share of tokens that skip a block; capacity k = ceil((1 - ratio) * N)",
        "base_model": model, **args, "bin": BIN, "tokens": tokens, "layers": routing.layers,
        "num_train_timesteps": routing.num_train_timesteps, "steps": step, "minutes": round(elapsed / 60, 2),
        "regions": [{"region": r, "t_lo": region_bounds(r, routing.regions, routing.num_train_timesteps)[0],
                     "t_hi": region_bounds(r, routing.regions, routing.num_train_timesteps)[1],
                     "learned": learned[r], "snapped": snapped[r],
                     "capacities": routing.capacities(r, tokens)} for r in range(routing.regions)],
        "mean_learned": float(np.mean(learned)), "mean_snapped": float(np.mean(snapped)),
        "log": log,
    }
    tmp = out / (RATIOS_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out / RATIOS_FILE)
    return record


def model_folder(source: str) -> Path:
    from export.load import BUNDLED_DIR

    return BUNDLED_DIR / "tiny-dit" if source == BUNDLED else Path(source)


def load_routing(source: str) -> tuple[MoDRouting, dict]:
    """The routers and ratios fine-tuned into the model folder ``source`` (snapped ratios, eval mode)."""
    from safetensors.torch import load_file

    folder = model_folder(source)
    ratios, routers = folder / RATIOS_FILE, folder / ROUTERS_FILE
    if not ratios.is_file() or not routers.is_file():
        raise DitmergeError(f"{source} has no MoD routers ({RATIOS_FILE}, {ROUTERS_FILE}): fine-tune it first with "
                            f"`python -m export.train_mod --model {source} --out DIR` and build the plan from DIR")
    record = json.loads(ratios.read_text())
    tensors = load_file(routers)
    channels = tensors["router.0.weight"].shape[1]
    routing = MoDRouting(channels, record["layers"], len(record["regions"]), record["num_train_timesteps"],
                         max_ratio=record["max_ratio"])
    routing.load_router_tensors(tensors)
    with torch.no_grad():
        routing.ratios.copy_(torch.tensor([r["snapped"] for r in record["regions"]]))
    return routing.eval(), record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.train_mod", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=BUNDLED, help="model to fine-tune (bundled:tiny-dit or a diffusers folder)")
    p.add_argument("--out", type=Path, required=True, help="output folder: fine-tuned model + routers + ratios")
    p.add_argument("--steps", type=int, default=300, help="total steps (a rerun with more steps resumes)")
    p.add_argument("--target", type=float, default=0.25, help="target mean compression ratio (share of tokens skipped)")
    p.add_argument("--lam", type=float, default=0.3, help="starting weight of the ratio loss")
    p.add_argument("--regions", type=int, default=10, help="timestep regions with their own ratios")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora-rank", type=int, default=8, help="LoRA rank of the block Linears")
    mode.add_argument("--full", action="store_true", help="fine-tune every weight instead of LoRA")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="model learning rate (LoRA 1e-3, full 1e-4)")
    p.add_argument("--ratio-lr", type=float, default=5e-3, help="learning rate of the ratios")
    p.add_argument("--max-ratio", type=float, default=0.7, help="largest compression a layer may learn")
    p.add_argument("--distill", type=float, default=1.0,
                   help="weight of the loss to the starting model's prediction (0: DiffCR's loss only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.out.resolve() == model_folder(BUNDLED).resolve():
        p.error("--out must not be the bundled model's folder")
    return run_cli(lambda: fine_tune(out=args.out, model=args.model, steps=args.steps, target=args.target,
                                     lam=args.lam, regions=args.regions, lora_rank=args.lora_rank, full=args.full,
                                     batch=args.batch, lr=args.lr, ratio_lr=args.ratio_lr, max_ratio=args.max_ratio,
                                     distill=args.distill, seed=args.seed, threads=args.threads))


if __name__ == "__main__":
    sys.exit(main())
