"""Train the shapes world's small models, check them through ComfyUI's own loaders, and write world/.

    python tools/train_world.py [--seed 0] [--out world] [--comfyui PATH]

Three files, all half precision, which the demo, the example workflows and the benchmarks use:

- `taesd3-world.safetensors`: a TAESD-format VAE with SD3's 16 latent channels (ComfyUI's VAELoader
  loads it from models/vae). It is trained on random scenes of trainer.demo.world, on 32x32 crops (the
  network is convolutional, and a crop costs a quarter of a full picture), with noise added to its
  latents so that it decodes a generator's imperfect latents too.
- `sd35-world.safetensors`: an SD3.5-architecture MMDiT of depth 3 (ComfyUI's UNETLoader loads it
  from models/diffusion_models), trained by rectified flow on the VAE's latents of random scenes,
  with 10% of its prompts dropped to the empty prompt so that CFG works.
- `prompts.safetensors`: every prompt of the world's grammar, encoded by trainer.demo.world.encode_prompts,
  with the empty prompt (zeros) as the negative: a trainer prompt bank, from which the demo writes
  the cached-conditioning files that DRM Load Cached Conditioning lists.

Then ComfyUI's loaders read the files back and sample every prompt with euler at 20 steps; the
oracle (trainer.demo.world.judge) says how many pictures show their prompt. `recipe.json` records the seed,
the settings, the time each stage took and that rate. The run is deterministic for a seed on one
machine; about 20 minutes on 2 CPU cores (recipe.json has the measured times).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass
class Recipe:
    seed: int = 0
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_crop: int = 32  # pixels; a multiple of 8
    vae_lr: float = 1e-3
    vae_latent_noise: float = 0.05  # std of the noise added to (unit-variance) latents while training the decoder
    scenes: int = 3000  # encoded once; the MMDiT trains on their latents
    depth: int = 3
    mmdit_steps: int = 3000
    mmdit_batch: int = 64
    mmdit_lr: float = 7e-4
    prompt_dropout: float = 0.1
    shift: float = 3.0  # SD3's timestep shift: the MMDiT trains on the noise levels it samples at
    eval_steps: int = 20
    eval_cfg: float = 4.0


def log(message: str) -> None:
    print(message, flush=True)


def random_batch(gen: torch.Generator, n: int):
    from trainer.demo.world import random_scene, render

    scenes = [random_scene(gen) for _ in range(n)]
    return render(scenes), [s.prompt for s in scenes]


def train_vae(r: Recipe, gen: torch.Generator):
    """A TAESD(16) trained to reconstruct the world's pictures from 16-channel latents."""
    from comfy.taesd.taesd import TAESD

    vae = TAESD(latent_channels=16)
    for module in vae.modules():  # comfy's layers skip initialisation; give them torch's
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.Conv2d.reset_parameters(module)
    encoder, decoder = vae.taesd_encoder, vae.taesd_decoder
    params = list(encoder.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.Adam(params, lr=r.vae_lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, r.vae_lr, total_steps=r.vae_steps, pct_start=0.1)
    cells = 64 // 8 - r.vae_crop // 8 + 1
    for step in range(1, r.vae_steps + 1):
        images, _ = random_batch(gen, r.vae_batch)
        y0, x0 = (int(v) * 8 for v in torch.randint(cells, (2,), generator=gen))
        crop = images[:, :, y0:y0 + r.vae_crop, x0:x0 + r.vae_crop]
        z = encoder(crop)
        scale = z.detach().std().clamp_min(1e-3)
        noisy = z + r.vae_latent_noise * scale * torch.randn(z.shape, generator=gen)
        decoded = decoder(noisy)  # L1 beside MSE keeps edges sharp
        loss = (torch.nn.functional.l1_loss(decoded, crop) + torch.nn.functional.mse_loss(decoded, crop)
                + 1e-4 * z.pow(2).mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == 1:
            log(f"vae step {step}/{r.vae_steps}: loss {loss.item():.5f}")
    return vae


@torch.no_grad()
def encode_scenes(vae, r: Recipe, gen: torch.Generator):
    latents, prompts = [], []
    for start in range(0, r.scenes, 100):
        images, texts = random_batch(gen, min(100, r.scenes - start))
        latents.append(vae.taesd_encoder(images))
        prompts += texts
    return torch.cat(latents), prompts


def train_mmdit(latents: torch.Tensor, prompts: list[str], r: Recipe, gen: torch.Generator) -> dict:
    """Rectified flow: x_s = (1 - s) x0 + s noise, and the MMDiT predicts noise - x0 at timestep 1000 s."""
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    from trainer.demo.tiny import tiny_generator_config, tiny_generator_state_dict
    from trainer.demo.world import all_prompts, encode_prompts

    model = MMDiT(**tiny_generator_config(r.depth), operations=torch.nn)
    model.load_state_dict(tiny_generator_state_dict(r.depth, seed=r.seed))
    with torch.no_grad():  # adaLN-zero, as DiT: every block starts as the identity, the output at zero
        for name, param in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                param.zero_()
    texts = all_prompts()
    context, pooled = encode_prompts(texts)
    index = torch.tensor([texts.index(p) for p in prompts])
    optimizer = torch.optim.AdamW(model.parameters(), lr=r.mmdit_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, r.mmdit_lr, total_steps=r.mmdit_steps, pct_start=0.1)
    model.train()
    for step in range(1, r.mmdit_steps + 1):
        rows = torch.randint(len(latents), (r.mmdit_batch,), generator=gen)
        x0 = latents[rows]
        t = torch.sigmoid(torch.randn(r.mmdit_batch, generator=gen))
        sigma = r.shift * t / (1 + (r.shift - 1) * t)
        noise = torch.randn(x0.shape, generator=gen)
        x = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        keep = (torch.rand(r.mmdit_batch, generator=gen) >= r.prompt_dropout).float()
        c, y = context[index[rows]] * keep.view(-1, 1, 1), pooled[index[rows]] * keep.view(-1, 1)
        loss = torch.nn.functional.mse_loss(model(x, sigma * 1000, context=c, y=y), noise - x0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == 1:
            log(f"mmdit step {step}/{r.mmdit_steps}: loss {loss.item():.4f}")
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


@torch.no_grad()
def oracle_match_rate(out: Path, r: Recipe) -> float:
    """Sample every prompt once through ComfyUI's own loaders (euler, 20 steps) and ask the oracle."""
    from trainer.demo.world import judge
    from trainer.demo.world_data import decode, load_world, sample

    world = load_world(out)
    texts = world.prompts.texts
    matched = sum(bool(judge(decode(world, sample(world, [i], r.seed + i, r.eval_cfg, r.eval_steps)), [text]).matches[0])
                  for i, text in enumerate(texts))
    return matched / len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "world"))
    parser.add_argument("--comfyui", help="ComfyUI tree (default: $COMFYUI_PATH)")
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage, to check the script")
    parser.add_argument("--eval-only", action="store_true",
                        help="only sample the files in --out and ask the oracle again (updates recipe.json)")
    args = parser.parse_args()

    from drm.host import import_comfy_or_exit

    import_comfy_or_exit(args.comfyui)
    import comfy.latent_formats

    from drm.files import atomic_save
    from trainer.demo.world import all_prompts, encode_prompts
    from trainer.prompts import PromptBank

    out = Path(args.out)
    if args.eval_only:
        if not (out / "recipe.json").is_file():
            raise SystemExit(f"--eval-only: {out} has no recipe.json; point --out at a folder this tool wrote.")
        record = json.loads((out / "recipe.json").read_text(encoding="utf-8"))
        start = time.perf_counter()
        record["oracle_match_rate"] = oracle_match_rate(out, Recipe(**record["recipe"]))
        record["seconds"]["eval_s"] = round(time.perf_counter() - start, 1)
        (out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
        log(f"oracle match rate: {record['oracle_match_rate']:.3f}")
        return
    r = Recipe(seed=args.seed)
    if args.quick:
        r.vae_steps, r.scenes, r.mmdit_steps = 30, 200, 30
    torch.manual_seed(r.seed)
    gen = torch.Generator().manual_seed(r.seed)
    out.mkdir(parents=True, exist_ok=True)
    times = {}

    start = time.perf_counter()
    vae = train_vae(r, gen).eval()
    times["vae_s"] = time.perf_counter() - start

    start = time.perf_counter()
    latents, prompts = encode_scenes(vae, r, gen)
    mean, std = float(latents.mean()), float(latents.std())
    latents = (latents - mean) / std  # what the MMDiT sees: SD3's process_in of the VAE's output
    # ComfyUI's TAESD: encode = encoder(x) / vae_scale + vae_shift, decode = decoder((z - vae_shift) * vae_scale);
    # the SD3 latent format then feeds the model (latent - shift_factor) * scale_factor = (z - mean) / std
    sd3 = comfy.latent_formats.SD3()
    vae_scale = std * sd3.scale_factor
    vae_shift = sd3.shift_factor - mean / vae_scale
    vae_sd = {k: v.half() for k, v in vae.state_dict().items() if k.startswith("taesd_")}
    vae_sd["vae_scale"], vae_sd["vae_shift"] = torch.tensor(vae_scale), torch.tensor(vae_shift)
    times["encode_s"] = time.perf_counter() - start

    start = time.perf_counter()
    mmdit_sd = train_mmdit(latents, prompts, r, gen)
    times["mmdit_s"] = time.perf_counter() - start

    texts = all_prompts()
    context, pooled = encode_prompts(texts)
    bank = PromptBank(texts, context.half(), pooled.half(), torch.zeros(1, 3, context.shape[2], dtype=torch.half),
                      torch.zeros(1, pooled.shape[1], dtype=torch.half))
    note = {"recipe": json.dumps(asdict(r)), "made_by": "tools/train_world.py"}
    atomic_save(vae_sd, out / "taesd3-world.safetensors", note)
    atomic_save({k: v.half() for k, v in mmdit_sd.items()}, out / "sd35-world.safetensors", note)
    bank.save(out / "prompts.safetensors")

    start = time.perf_counter()
    rate = oracle_match_rate(out, r)
    times["eval_s"] = time.perf_counter() - start
    sizes = {p.name: p.stat().st_size for p in sorted(out.glob("*.safetensors"))}
    record = {"recipe": asdict(r), "seconds": {k: round(v, 1) for k, v in times.items()},
              "torch": torch.__version__, "threads": torch.get_num_threads(), "oracle_match_rate": rate,
              "bytes": sizes, "total_mb": round(sum(sizes.values()) / 2**20, 2)}
    (out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    log(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
