"""``mdm-fast sample``: images for prompts or class labels, in one process or split over torchrun's.

The run's images are cut into batches of ``--batch`` (prompt-major, ``--num-per-prompt`` each); batch b
draws its noise from a generator seeded with ``(--seed, b)`` and goes to process ``b % WORLD_SIZE``. So
the same seed, prompts and ``--batch`` give the same files whatever the number of processes, and a batch
whose files all exist can be skipped (``--skip-existing``) without changing any other, once the folder's
``sample.json`` shows that the same run made them. Memory stays bounded however many prompts: each batch
is written as it is done, and rank 0 draws the grid from the files of the first ``--grid-rows`` prompts
once every process has finished.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from mdm_fast.train.distributed import DistInfo


def image_name(prompt: int, copy: int, level: int, px: int) -> str:
    """The file of one image: prompt index, copy of that prompt, nesting level (0: the top), its width."""
    return f"{prompt:03d}_{copy:02d}_level{level}_{px}px.png"


def load_for_sampling(checkpoint: str, config: Optional[str], device: torch.device, use_ema: bool = True,
                      overrides: Optional[List[str]] = None, trust_pickle: bool = False):
    """(cfg, encoder, model, diffusion) from one of our checkpoints (its config inside) or a public
    checkpoint plus its YAML (``trust_pickle``: one that pickles its training args)."""
    from mdm_fast.config import load_experiment
    from mdm_fast.text import build_text_encoder
    from mdm_fast.train.checkpoint import load_checkpoint, load_weights
    from mdm_fast.train.trainer import build_diffusion, build_network

    ckpt = load_checkpoint(Path(checkpoint), trust_pickle=trust_pickle)
    if config:
        cfg = load_experiment(config, overrides)
    elif "config" in ckpt:
        import yaml

        cfg = load_experiment(yaml.safe_load(ckpt["config"]), overrides)
    else:
        raise ValueError(f"{checkpoint} is a public checkpoint without a config: pass --config X.yaml")
    encoder = build_text_encoder(cfg, device)
    model = build_network(cfg, encoder.embed_dim, device)
    state = ckpt["ema_state_dict"] if use_ema and "ema_state_dict" in ckpt else ckpt["state_dict"]
    load_weights(model, state, Path(checkpoint))
    model.eval().requires_grad_(False)  # sampling only: the fast model keeps the weights it derives
    return cfg, encoder, model, build_diffusion(cfg, model)


def check_arguments(args) -> None:
    """The checks that need nothing loaded."""
    for name in ("num_per_prompt", "batch", "steps", "grid_scale"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.grid_rows < 0:
        raise ValueError(f"--grid-rows: expected >= 0 (0: no grid), got {args.grid_rows}")
    for name in ("guidance", "eta"):  # NaN passes every comparison: all-black images, exit 0
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{name}: expected a finite number, got {value}")
    if args.negative_prompt is not None and args.guidance == 1.0:
        raise ValueError("--negative-prompt: only used with --guidance != 1 (classifier-free guidance)")
    overrides = [p for p in args.prompts or [] if re.fullmatch(r"[A-Za-z_][\w.-]*=\S*", p)]
    if overrides:
        raise ValueError(f"--prompts {overrides}: these look like KEY=VALUE config overrides, which go before "
                         "--prompts (every word after it is read as a prompt); such a prompt can come from "
                         "--prompt-file")


def read_prompts(args) -> List[str]:
    """--prompts, then --labels, then --prompt-file's (:func:`read_prompt_file`)."""
    prompts = list(args.prompts or []) + [str(label) for label in (args.labels or [])]
    if args.prompt_file:
        prompts += read_prompt_file(Path(args.prompt_file))
    if not prompts:
        raise ValueError("sample: give --prompts, --labels or --prompt-file")
    return prompts


def read_prompt_file(path: Path) -> List[str]:
    """A table with a ``caption`` column (a .tsv or .csv whose header names it, as the public prompt files'
    and a captions.tsv's do, or a .jsonl), read as the data tables are (quoted fields, a byte-order mark);
    else one prompt per non-empty line, its last tab-separated column (prompts_demo.tsv, the prompts.tsv
    this command writes)."""
    from mdm_fast.data.datasets import read_table, table_delimiter

    lines = path.read_text(encoding="utf-8-sig").splitlines()
    suffix = path.suffix.lower()
    header = lines[0].split(table_delimiter(path)) if lines and suffix in (".tsv", ".csv") else []
    if suffix == ".jsonl" or "caption" in [h.strip() for h in header]:
        return [r["caption"].strip() for r in read_table(path) if isinstance(r.get("caption"), str)
                and r["caption"].strip()]
    return [line.split("\t")[-1].strip() for line in lines if line.strip()]


MANIFEST = "sample.json"  # what made the images of an --out folder


def run_manifest(args, prompts: List[str], image_size: int, autocast: Optional[torch.dtype]) -> dict:
    """Everything that decides the images of a run (not how fast it goes: --cuda-graphs, --device, the
    number of processes)."""
    fields = ("seed", "batch", "num_per_prompt", "steps", "guidance", "negative_prompt", "eta", "no_ema", "overrides")
    manifest = {name: getattr(args, name) for name in fields}
    manifest.update(checkpoint=str(Path(args.checkpoint).resolve()), checkpoint_id=file_id(Path(args.checkpoint)),
                    config=str(Path(args.config).resolve()) if args.config else None, image_size=image_size,
                    autocast=str(autocast), prompts_sha256=hashlib.sha256(json.dumps(prompts).encode()).hexdigest())
    return manifest


def file_id(path: Path, span: int = 1 << 22) -> str:
    """A file's size and a hash of its first and last ``span`` bytes: another checkpoint written over the
    same path (other weights) is told apart without reading gigabytes."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(span))
        f.seek(max(size - span, 0))
        digest.update(f.read(span))
    return f"{size}:{digest.hexdigest()}"


def _remove_images(out: Path) -> None:
    """A run without --skip-existing makes every image again: none of another run may stay among them."""
    for path in [*out.glob("*_level*px.png"), out / "grid.png"]:
        path.unlink(missing_ok=True)


def check_resumable(out: Path, manifest: dict) -> None:
    """--skip-existing keeps the images in ``out`` only if this same run made them."""
    path = out / MANIFEST
    if not path.exists():
        if any(out.glob("*_level*px.png")):
            raise ValueError(f"--skip-existing: {out} holds images without a {MANIFEST} that tells which run made "
                             "them; use another --out, or drop --skip-existing to make them all again")
        return
    old = json.loads(path.read_text())
    differ = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
    if differ:
        raise ValueError(f"--skip-existing: {out} holds the images of another run (its {MANIFEST} differs in "
                         f"{', '.join(differ)}); use another --out, or drop --skip-existing to make them all again")


def _device(args) -> torch.device:
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}") from None
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.type == "cuda" and (device.index or 0) >= visible:
            raise ValueError(f"--device {args.device}: no such CUDA device here ({visible} visible)")
        return device
    # under torchrun, init_distributed made this process's GPU (LOCAL_RANK) the current one
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def check_run(args, diffusion, encoder, prompts: List[str], device: torch.device) -> None:
    """What sampling would refuse, refused before the --out folder is touched (a run without
    --skip-existing removes the folder's images first): the steps and eta, prompts the encoder cannot
    take (a class model's: all of them; a text model's: the first, which shows the encoder works), the
    negative prompt, --cuda-graphs on without CUDA."""
    from mdm_fast.text import ClassLabelEncoder, encode_prompts

    diffusion.sampler(num_inference_steps=args.steps, ddim_eta=args.eta)
    encode_prompts(encoder, prompts if isinstance(encoder, ClassLabelEncoder) else prompts[:1], device)
    if args.negative_prompt is not None:
        encode_prompts(encoder, [args.negative_prompt], device, what="negative_prompt")
    if args.cuda_graphs == "on" and device.type != "cuda":
        raise ValueError(f"--cuda-graphs on: needs a CUDA device, sampling on {device}")


def cmd_sample(args) -> int:
    from mdm_fast.files import write_text_atomic
    from mdm_fast.data.loader import derived_seed
    from mdm_fast.text import ClassLabelEncoder
    from mdm_fast.train.distributed import barrier, init_distributed
    from mdm_fast.train.trainer import autocast_dtype

    check_arguments(args)
    info = init_distributed()
    device = _device(args)
    cfg, encoder, model, diffusion = load_for_sampling(args.checkpoint, args.config, device, not args.no_ema,
                                                       args.overrides, args.trust_pickle)
    if args.labels and not isinstance(encoder, ClassLabelEncoder):
        raise ValueError(f"--labels: {args.checkpoint}'s model is conditioned on text ({type(encoder).__name__}), "
                         "not on class labels; give --prompts or --prompt-file")
    prompts = read_prompts(args)
    image_size = args.image_size or cfg.image_size
    model.check_image_size(image_size)
    widths = [w for _, w in diffusion.level_sizes(image_size)]  # top level first
    autocast = {"config": autocast_dtype(cfg, device), "bf16": torch.bfloat16, "fp32": None}[args.precision]
    check_run(args, diffusion, encoder, prompts, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = run_manifest(args, prompts, image_size, autocast)
    if args.skip_existing:
        check_resumable(out, manifest)
    barrier(info)  # no process writes before every one has read what is there
    if info.is_main:
        if not args.skip_existing:
            _remove_images(out)  # before the manifest says they are this run's
        write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        one_line = [re.sub(r"[\t\r\n]", " ", p) for p in prompts]
        write_text_atomic(out / "prompts.tsv", "".join(f"{k}\t{p}\n" for k, p in enumerate(one_line)))
    barrier(info)  # and none writes an image before the folder is this run's
    jobs = [(k, i) for k in range(len(prompts)) for i in range(args.num_per_prompt)]  # (prompt, copy)
    batches = [jobs[s:s + args.batch] for s in range(0, len(jobs), args.batch)]
    counts = torch.zeros(2, dtype=torch.long)  # images generated, skipped (their files were there)
    cache: dict = {}  # the batches share their sampler, conditioning buffers and captured step
    mine = range(info.rank, len(batches), info.world_size)
    for b in tqdm(mine, desc=f"batches of {args.batch}", disable=not info.is_main or len(mine) < 2):
        paths = [[out / image_name(k, i, d, px) for d, px in enumerate(widths)] for k, i in batches[b]]
        if args.skip_existing and all(p.exists() for row in paths for p in row):
            counts[1] += len(paths)
            continue
        # seeded as the loader seeds its epochs: seed 1's first batch is not seed 0's second
        _sample_batch(args, diffusion, model, encoder, [prompts[k] for k, _ in batches[b]], image_size, device,
                      torch.Generator(device).manual_seed(derived_seed(args.seed, b)), cache, autocast, paths,
                      progress=info.is_main)
        counts[0] += len(paths)
    counts = _total(counts, info)  # waits for every process: every file is written before rank 0 reads the grid's
    if not info.is_main:
        return 0
    result = {"images": len(jobs), "generated": int(counts[0]), "skipped": int(counts[1]), "out": str(out)}
    if args.grid_rows:
        rows = prompts[:args.grid_rows]
        _write_grid(out, rows, args.num_per_prompt, widths, args.grid_scale)
        result["grid"] = str(out / "grid.png")
    print(json.dumps(result))
    return 0


def _sample_batch(args, diffusion, model, encoder, prompts: List[str], image_size: int, device: torch.device,
                  generator: torch.Generator, cache: dict, autocast, paths: List[List[Path]],
                  progress: bool) -> None:
    """One batch sampled and written: ``paths[j][d]`` is image j's file at level d."""
    from PIL import Image

    from mdm_fast.files import save_image_atomic
    from mdm_fast.train.grids import generate, to_uint8

    levels = generate(diffusion, model, encoder, prompts, 1, image_size, device, steps=args.steps,
                      guidance=args.guidance, generator=generator, negative_prompt=args.negative_prompt,
                      ddim_eta=args.eta, progress=progress,
                      cuda_graphs={"auto": None, "on": True, "off": False}[args.cuda_graphs], cache=cache,
                      autocast=autocast)
    for d, lvl in enumerate(levels):
        for j, pixels in enumerate(to_uint8(lvl)):  # (H, W, C)
            save_image_atomic(Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels), paths[j][d])


def _total(counts: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The counts summed over the processes (on a GPU where the process group is NCCL's, whatever
    --device sampled on)."""
    if info.world_size <= 1:
        return counts
    import torch.distributed as dist

    summed = counts.cuda() if dist.get_backend() == "nccl" else counts
    dist.all_reduce(summed)
    return summed.cpu()


def _write_grid(out: Path, prompts: List[str], per_prompt: int, widths: List[int], scale: int) -> None:
    """grid.png: a row per prompt, every copy and level of it, read back from the files (exactly the
    pixels written: the PNGs are lossless and :func:`from_uint8` inverts :func:`to_uint8`)."""
    from PIL import Image

    from mdm_fast.train.grids import from_uint8, save_grid

    levels = [torch.cat([from_uint8(np.asarray(Image.open(out / image_name(k, i, d, px)))[None])
                         for k in range(len(prompts)) for i in range(per_prompt)])
              for d, px in enumerate(widths)]
    save_grid(levels, out / "grid.png", len(prompts), [p[:24] for p in prompts], scale)
