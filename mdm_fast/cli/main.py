"""The ``mdm-fast`` command line: train, sample, convert, info, summary, demo."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

# Idle OpenMP threads sleep instead of spinning: on a busy CPU, spinning threads of a 2-thread
# process get descheduled and each small op can wait a whole time slice (10x slower steps).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mdm_fast.cli.sample import cmd_sample  # noqa: E402

log = logging.getLogger("mdm_fast")


# ---- train ---------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from mdm_fast.config import load_experiment
    from mdm_fast.train import Trainer

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps: expected >= 1 (steps of this run), got {args.steps}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise ValueError(f"--time-limit: expected minutes > 0, got {args.time_limit}")
    deadline = None if args.time_limit is None else time.time() + 60 * args.time_limit
    cfg = load_experiment(args.config, overrides)
    trainer = Trainer(cfg)
    result = trainer.train(stop_after=args.steps, deadline=deadline)
    if trainer.dist.is_main:
        print(json.dumps({"step": result["step"], "output_dir": str(trainer.out),
                          "skipped_images": result.get("skipped_images", 0)}))
    return 0


# ---- convert -------------------------------------------------------------------------------------
def cmd_convert(args) -> int:
    from mdm_fast.train.convert import convert

    info = convert(args.input, args.output, to=args.to, use_ema=args.ema, config=args.config,
                   trust_pickle=args.trust_pickle, text_dim=args.text_dim)
    print(json.dumps(info))
    return 0


# ---- info ----------------------------------------------------------------------------------------
def backend_report() -> dict:
    """Versions, devices, the compiled extension, and per op and backend: available or why not."""
    import importlib

    report = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
              "cuda_version": torch.version.cuda, "devices": []}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError as e:
        report["triton"] = f"not installed ({e})"
    if torch.cuda.is_available():
        report["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        report["devices"] = ["cpu"]
    from mdm_fast import _ext

    report["mdm_fast._C"] = "built" if _ext.ext is not None else f"not built: {_ext.load_error}"
    ops = importlib.import_module("mdm_fast.ops")

    probe = torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")
    report["ops"] = {}
    for name, op in sorted(ops.registered_ops().items()):
        row = {}
        for backend in op.reasons:  # the op's own backends
            fn = op.reasons[backend]
            try:
                reason = fn(probe)
            except TypeError:
                reason = _device_reason(backend, probe)
            except Exception as e:  # the reason function wanted other arguments
                reason = _device_reason(backend, probe) or f"(could not probe: {e})"
            row[backend] = "available" if reason is None else f"unavailable: {reason}"
        report["ops"][name] = row
    return report


def _device_reason(backend: str, probe: torch.Tensor) -> Optional[str]:
    from mdm_fast.ops import dispatch

    if backend == "triton":
        return dispatch.triton_reason(probe)
    if backend == "cuda":
        return dispatch.cuda_ext_reason(probe)
    return None


def cmd_info(args) -> int:
    report = backend_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"torch {report['torch']}  triton {report['triton']}  CUDA {report['cuda_version'] or 'none'}")
    print(f"devices: {', '.join(report['devices'])}")
    print(f"mdm_fast._C: {report['mdm_fast._C']}")
    if not report["ops"]:
        print("ops: none registered yet")
    for name, row in report["ops"].items():
        print(f"op {name}:")
        for backend, state in row.items():
            print(f"  {backend:7s} {state}")
    return 0


# ---- summary -------------------------------------------------------------------------------------
def cmd_summary(args) -> int:
    from mdm_fast.config import load_experiment, text_width
    from mdm_fast.reference import build_model
    from mdm_fast.reference.summary import describe

    cfg = load_experiment(args.config, args.overrides)
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.unet_dict(text_width(cfg, args.text_dim)))
    size = args.image_size or cfg.image_size
    print(f"{cfg.name or Path(args.config).stem}: {cfg.model}, {size}x{size}")
    print(describe(model, size))
    return 0


# ---- demo ----------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from mdm_fast.cli.demo import run_demo

    for name in ("steps", "minutes"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"--{name}: expected >= 0 (0: by device), got {getattr(args, name)}")
    result = run_demo(Path(args.out), steps=args.steps, minutes=args.minutes, quick=args.quick, resume=args.resume)
    print(json.dumps(result))
    return 0


TRUST_PICKLE = "read public files that pickle Python objects (their 'args'); only for files you trust"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdm-fast", description="Matryoshka Diffusion Models, fast.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from an experiment YAML (resumes from output_dir)")
    t.add_argument("--config", required=True, help="experiment YAML (public ml-mdm format)")
    t.add_argument("--output-dir", help="where checkpoints and logs go (overrides output_dir)")
    t.add_argument("--steps", type=int, help="stop after this many steps of this run")
    t.add_argument("--time-limit", type=float, metavar="MINUTES",
                   help="stop after the step that ends past this many minutes from the start (a cluster job's "
                        "wall-time limit, less the time a checkpoint takes), with a checkpoint")
    t.add_argument("overrides", nargs="*",
                   help="KEY=VALUE overrides, dotted for sections (reader_config.image_size=64)")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="sample images for prompts or class labels")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--config", help="experiment YAML (needed for public checkpoints)")
    s.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)
    s.add_argument("--prompts", nargs="*", help="captions (text models) or class indices")
    s.add_argument("--labels", nargs="*", type=int, help="class labels (class-conditioned models)")
    s.add_argument("--prompt-file", help="a table with a 'caption' column (.tsv/.csv with that header, .jsonl), "
                   "else one prompt per line (its last tab-separated column)")
    s.add_argument("--num-per-prompt", type=int, default=4)
    s.add_argument("--steps", type=int, default=50, help="inference steps")
    s.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    s.add_argument("--negative-prompt", help="what guidance steers away from (default: the empty caption's "
                                             "encoding for text models, as the public sampler; zeros for class models)")
    s.add_argument("--eta", type=float, default=None, help="DDIM eta (default: ancestral DDPM)")
    s.add_argument("--seed", type=int, default=0, help="batch b's noise is seeded by (seed, b): the same seed, "
                                                       "prompts and --batch give the same images in any number of "
                                                       "processes (torchrun splits the batches)")
    s.add_argument("--batch", type=int, default=16, help="images per forward batch")
    s.add_argument("--image-size", type=int, default=0)
    s.add_argument("--grid-scale", type=int, default=1)
    s.add_argument("--grid-rows", type=int, default=32, help="grid.png shows the first N prompts (0: no grid)")
    s.add_argument("--skip-existing", action="store_true",
                   help="skip the batches whose files are all in --out (a run started again after a stop)")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    s.add_argument("--cuda-graphs", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="capture each denoising step (all levels, guidance, update) once and replay it; "
                        "auto (default): on CUDA")
    s.add_argument("--precision", default="config", choices=["config", "bf16", "fp32"],
                   help="the model's arithmetic: bf16 autocast, fp32, or config (default): bf16 where the "
                        "config trains under it (fp16: 1) on CUDA, else fp32")
    s.add_argument("--device")
    s.add_argument("--out", default="samples")
    s.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    s.set_defaults(fn=cmd_sample)  # mdm_fast/cli/sample.py

    c = sub.add_parser("convert", help="public checkpoint <-> ours (lossless)")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--to", choices=["ours", "public"], required=True)
    c.add_argument("--ema", action="store_true", help="to public: export the EMA weights")
    c.add_argument("--config", help="to ours: the experiment YAML to store with the weights (which must fit the "
                   "model it builds)")
    c.add_argument("--text-dim", type=int, default=0,
                   help="with --config: the text width (default: the config's; the file's where the config's "
                        "text model is of unknown width)")
    c.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE)
    c.set_defaults(fn=cmd_convert)

    i = sub.add_parser("info", help="backends, devices and versions")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    m = sub.add_parser("summary", help="per-resolution structure, parameters and FLOPs of a config's model")
    m.add_argument("--config", required=True)
    m.add_argument("--image-size", type=int, default=0)
    m.add_argument("--text-dim", type=int, default=0, help="text width (default: from the config's text model)")
    m.add_argument("overrides", nargs="*")
    m.set_defaults(fn=cmd_summary)

    d = sub.add_parser("demo", help="train a small nested model on 8x8 digits -> 32x32 and sample a grid")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=0, help="training steps (default: by device)")
    d.add_argument("--minutes", type=float, default=0, help="training time budget (default: by device)")
    d.add_argument("--quick", action="store_true", help="a tiny run for smoke tests")
    d.add_argument("--resume", action="store_true", help="continue from checkpoints in --out")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from mdm_fast.train.checkpoint import CheckpointError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, CheckpointError, OSError) as e:  # OSError: a missing file, a read-only folder, ...
        print(f"mdm-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"mdm-fast {args.command}: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return 130
    finally:  # the process group a command under torchrun joined (train, sample)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
