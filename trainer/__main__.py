"""Command line: `python -m trainer <command> --help`.

  demo   the pipeline end to end on the shapes world, judged by its oracle (--tiny: on random weights)
  drm    train a DRM from preference pairs
  grpo   fine-tune SD3.5 into a LoRA with Step-wise GRPO (or the GRPO baseline) against a DRM
  import-dina  convert a DiNa-LRM snapshot (public SD3.5-M reward model) into a DRM file
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from .config import ConfigError, add_arguments, load_config
from .grpo.config import GRPOConfig
from .reward.config import DRMTrainConfig

CONFIGS = {"drm": DRMTrainConfig, "grpo": GRPOConfig}


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (loading, encoding, evaluating): nothing to save
        print("stopped by Ctrl-C before a checkpoint could be saved; run the same command again to start over.",
              file=sys.stderr)
        return 130


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    comfyui_help = "ComfyUI tree to use (default: $COMFYUI_PATH, then the ComfyUI holding this pack)"
    parser.add_argument("--comfyui", metavar="PATH", help=comfyui_help)
    # also accepted after the command (`python -m trainer demo --comfyui PATH`), where users put it
    uses_comfyui = argparse.ArgumentParser(add_help=False)
    uses_comfyui.add_argument("--comfyui", metavar="PATH", default=argparse.SUPPRESS, help=comfyui_help)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", parents=[uses_comfyui],
                               help="run the pipeline on the shapes world (world/), judged by its oracle")
    demo.add_argument("--out", help="output folder (default runs/demo, or runs/demo-tiny with --tiny; an earlier "
                                    "demo there is replaced, unless --install can reuse it)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--install", action="store_true",
                      help="copy the world model, VAE, DRM, LoRA and prompts into ComfyUI's models folder, for the "
                           "example workflows; a demo that finished in --out with the same --seed is reused "
                           "(copying only, seconds), otherwise the demo runs first")
    demo.add_argument("--tiny", action="store_true",
                      help="every stage on a tiny random-weight model instead, in under a minute (its pictures are noise)")
    add_arguments(commands.add_parser("drm", parents=[uses_comfyui], help="train a DRM from preference pairs"),
                  DRMTrainConfig)
    add_arguments(commands.add_parser("grpo", parents=[uses_comfyui], help="Step-GRPO / GRPO fine-tuning to a ComfyUI LoRA"),
                  GRPOConfig)
    dina = commands.add_parser("import-dina", help="convert a DiNa-LRM snapshot folder into a DRM file (needs no ComfyUI)")
    dina.add_argument("snapshot", help="the snapshot folder (config.json, checkpoint/backbone_lora/, checkpoint/rm_head.pt)")
    dina.add_argument("--out", required=True, help="the DRM file to write (.safetensors), e.g. ComfyUI/models/drm/dina-lrm-sd35m.safetensors")
    args = parser.parse_args(argv)

    if args.command == "import-dina":
        return _import_dina(args.snapshot, args.out)

    if args.command == "demo" and args.tiny and args.install:
        print("error: --install copies the world demo's files for the example workflows; drop --tiny or --install",
              file=sys.stderr)
        return 2
    try:  # configuration errors are reported before any model loads
        config = load_config(CONFIGS[args.command], args) if args.command in CONFIGS else None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from drm.host import ComfyUIUnavailable, import_comfy, missing_trainer_packages

    missing = missing_trainer_packages()  # before any work, not when the first figure is drawn
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    try:
        import_comfy(args.comfyui)
    except ComfyUIUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .runs import RunInterrupted, out_lock

    if args.command == "demo":
        from .demo.tiny_demo import run_tiny_demo
        from .demo.world_demo import run_demo

        try:
            import folder_paths

            if args.tiny:
                run_tiny_demo(out=args.out or "runs/demo-tiny", seed=args.seed)
            else:
                run_demo(out=args.out or "runs/demo", seed=args.seed,
                         install_into=Path(folder_paths.models_dir) if args.install else None)
        except RunInterrupted as e:
            print(f"stopped: {e}", file=sys.stderr)
            return 130
        except Exception as e:
            return _failed(e, run_out=None)
    else:
        from .grpo.train import train_grpo
        from .reward.train import train_drm

        try:
            # one lock per run: under torchrun / accelerate only rank 0 takes it (the ranks share `out`)
            with out_lock(config.out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
                (train_drm if args.command == "drm" else train_grpo)(config)
        except RunInterrupted as e:  # the checkpoint makes --resume continue exactly
            if os.environ.get("RANK", "0") == "0":
                print(e.args[0])
            return 130  # not 0: a script running `drm ... && grpo ...` must not go on as if training finished
        except Exception as e:
            return _failed(e, run_out=Path(config.out))
    return 0


def _failed(error: Exception, run_out: Path | None) -> int:
    """Exit status 2 and one line on stderr for what the user can fix, else `error` re-raised: a full disk
    (wherever it shows in the error's chain: torch and safetensors wrap it), bad data or models or a diverged
    run (ValueError, which says what to do), and, for a trainer's run into `run_out`, running out of memory."""
    from drm.files import disk_full

    from .runs import UNWRITABLE, full_disk_message, unwritable_message

    full = disk_full(error)
    if full is not None:
        print(f"error: {full_disk_message(full, run_out)}", file=sys.stderr)
    elif isinstance(error, OSError) and error.errno in UNWRITABLE and error.filename:
        print(f"error: {unwritable_message(error, run_out)}", file=sys.stderr)
    elif isinstance(error, ValueError):
        print(f"error: {error}", file=sys.stderr)
    elif run_out is not None and (isinstance(error, MemoryError) or isinstance(error, RuntimeError) and (
            "out of memory" in str(error) or "allocate memory" in str(error))):
        print(f"error: out of memory ({str(error).splitlines()[0][:160]}). Lower batch_size or resolution (or, for "
              "grpo, group / branches); with --resume the run continues from its last checkpoint.", file=sys.stderr)
    else:
        raise error
    return 2


def _import_dina(snapshot: str, out: str) -> int:
    from drm.dina import SnapshotError, import_dina

    if not out.endswith(".safetensors"):
        print(f"error: --out {out}: expected a .safetensors file name (DRM Loader lists only those).", file=sys.stderr)
        return 2
    from drm.files import disk_full

    from .runs import full_disk_message

    try:
        metadata = import_dina(snapshot, out)
    except SnapshotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out cannot be written: a full disk, its folder is a file, it is a folder, no permission
        full = disk_full(e)
        print(f"error: {full_disk_message(full)}" if full else
              f"error: --out {out} cannot be written ({e.strerror or e}); choose another path.", file=sys.stderr)
        return 2
    print(f"Wrote {out}: a DiNa-LRM DRM keeping {metadata['drm.blocks']} blocks (adapter format: connect the SD3.5-Medium "
          f"MODEL to DRM Loader). Scores are raw, higher is better; DRM Score Latent noises clean latents to sigma "
          f"{metadata['drm.noise_sigma']} first, DRM Score Image to {metadata['drm.noise_sigma_image']}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
