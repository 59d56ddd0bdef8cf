"""Training: the loss goes down, resume is bit-identical, DDP matches one process, checkpoints are
atomic and a truncated one is detected, progressive training loads and freezes the inner model."""
import json
import math
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mdm_fast.config import load_experiment
from mdm_fast.data import collate, to_model_range
from mdm_fast.engine import GraphedCallable
from mdm_fast.reference import build_model
from mdm_fast.train import CheckpointError, ModelEma, Trainer, load_checkpoint, load_latest, save_atomic
from mdm_fast.train.checkpoint import list_checkpoints
from test_text import needs_minilm

INNER = {"resolution_channels": [16, 32], "num_resnets_per_resolution": [1, 1], "attention_levels": [1],
         "num_attention_layers": [0, 1], "masked_cross_attention": 0, "temporal_dim": 32, "nesting": True,
         "conditioning_feature_proj_dim": -1, "resnet_config": {"num_groups_norm": 4}}
OUTER = {"resolution_channels": [8, 16], "num_resnets_per_resolution": [1, 1], "attention_levels": [],
         "num_attention_layers": [0, 0], "masked_cross_attention": 0, "temporal_dim": 32, "skip_mid_blocks": True,
         "conditioning_feature_proj_dim": -1, "resnet_config": {"num_groups_norm": 4}, "inner_config": INNER}
DIFFUSION = {"sampler_config": {"num_diffusion_steps": 1000, "schedule_type": "DEEPFLOYD",
                                "prediction_type": "V_PREDICTION", "schedule_shifted": True},
             "use_vdm_loss_weights": False, "use_double_loss": True, "no_use_residual": True}


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models gain nothing from threads; one thread also makes the DDP ranks' arithmetic the same
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(out, **over):
    d = {"model": "nested_unet", "unet_config": OUTER, "diffusion_config": DIFFUSION, "file_list": "sklearn:digits",
         "categorical_conditioning": 10, "reader_config": {"image_size": 16, "num_readers": 0},
         "output_dir": str(out), "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "num_training_steps": 6,
         "save_freq": 2, "log_freq": 1, "seed": 0, "ema_decay": 0.9, "cond_drop_prob": 0.25}
    d.update(over)
    return load_experiment(d)


def _eval_loss(trainer, seed=123):
    import mdm_fast.data as data

    batch = data.collate([trainer.dataset[(i, i)] for i in range(16)])
    images = data.to_model_range(batch["image"])
    cond, mask = trainer.encoder.encode_batch(batch, torch.device("cpu"))
    with torch.no_grad():
        loss, _ = trainer.diffusion.loss(trainer.model, images, cond, mask,
                                         generator=torch.Generator().manual_seed(seed))
    return loss.item()


def test_short_training_lowers_the_loss(tmp_path):
    tr = Trainer(tiny(tmp_path, num_training_steps=40, save_freq=40, cond_drop_prob=0.0, sample_freq=40), quiet=True)
    before = sum(_eval_loss(tr, s) for s in range(3))
    tr.train()
    after = sum(_eval_loss(tr, s) for s in range(3))
    assert after < 0.8 * before, (before, after)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 40 and '"loss_level1"' in lines[0]
    assert (tmp_path / "samples" / "step_00000040.png").stat().st_size > 0  # the periodic sample grid


def _image_table(folder: Path, n: int, corrupt=()) -> Path:
    """``folder/labels.tsv``: n 16x16 images labelled 0..n-1, the ``corrupt`` ones not images."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = ["file\tlabel"]
    for i in range(n):
        if i in corrupt:
            (folder / f"img{i}.png").write_bytes(b"not an image")
        else:
            Image.new("RGB", (16, 16), (15 * i, 100, 50)).save(folder / f"img{i}.png")
        rows.append(f"img{i}.png\t{i}")
    (folder / "labels.tsv").write_text("\n".join(rows) + "\n")
    return folder / "labels.tsv"


def test_unreadable_images_are_counted_in_the_log_and_the_result(tmp_path):
    """A corrupt image is replaced by the next one and counted: two corrupt files of eight, each read once
    in the one epoch that two steps of four draw, make skipped_images 2 (the result and the last log line)."""
    cfg = tiny(tmp_path / "out", file_list=str(_image_table(tmp_path, 8, corrupt=(1, 5))), categorical_conditioning=8,
               num_training_steps=2)
    result = Trainer(cfg, quiet=True).train()
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert result["skipped_images"] == lines[-1]["skipped_images"] == 2


def test_periodic_sample_grids_come_from_the_ema_every_sample_freq_steps(tmp_path, monkeypatch):
    """sample_freq 2 over 4 steps: a grid at steps 2 and 4, sampled from the EMA weights (not the trained
    model's), one row of 4 per class (the first 10), with guidance 2 (conditioning dropout trained the
    unconditional model), in fp32 on a CPU even with fp16 set."""
    import mdm_fast.train.grids as grids

    calls, generate = [], grids.generate

    def spy(diffusion, model, encoder, prompts, per_prompt, *args, **kwargs):
        calls.append((tr.step, model is tr.ema.module, list(prompts), per_prompt, kwargs["guidance"],
                      kwargs["autocast"]))
        return generate(diffusion, model, encoder, prompts, per_prompt, *args, **{**kwargs, "steps": 2})

    monkeypatch.setattr(grids, "generate", spy)
    tr = Trainer(tiny(tmp_path, num_training_steps=4, sample_freq=2, fp16=1), quiet=True)
    tr.train()
    assert calls == [(step, True, [str(i) for i in range(10)], 4, 2.0, None) for step in (2, 4)]
    for step in (2, 4):
        assert (tmp_path / "samples" / f"step_{step:08d}.png").stat().st_size > 0


def test_sample_grid_puts_each_sample_in_its_cell_lowest_level_first():
    """grid_image: sample i of rows x cols fills row i // cols, column i % cols (4 white pixels around
    cells); a cell shows the levels side by side, lowest first, enlarged to the top size by repeating
    pixels, 2 white columns between them; pixels are the reader's uint8 values exactly, (x - 127) / 128
    inverted."""
    from mdm_fast.data import to_model_range
    from mdm_fast.train.grids import grid_image

    top = torch.randint(0, 256, (6, 4, 4, 3), dtype=torch.uint8)  # (B, H, W, C)
    low = torch.randint(0, 256, (6, 2, 2, 3), dtype=torch.uint8)
    image = np.asarray(grid_image([to_model_range(top), to_model_range(low)], rows=2))
    want = np.full((2 * (4 + 4) + 4, 3 * (10 + 4) + 4, 3), 255, np.uint8)  # (H, W, C)
    for i in range(6):
        y, x = 4 + (i // 3) * 8, 4 + (i % 3) * 14
        want[y:y + 4, x:x + 4] = low[i].numpy().repeat(2, 0).repeat(2, 1)
        want[y:y + 4, x + 6:x + 10] = top[i].numpy()
    assert np.array_equal(image, want)


def _state(path):
    ck = load_checkpoint(path)
    return ck


def _assert_same(a, b):
    for key in ("state_dict", "ema_state_dict"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), ("optimizer", i, k)
    assert a["scheduler"] == b["scheduler"] and a["step"] == b["step"]


def test_resume_after_a_crash_is_bit_identical(tmp_path):
    Trainer(tiny(tmp_path / "full"), quiet=True).train()
    crashed = Trainer(tiny(tmp_path / "cut"), quiet=True)
    crashed.train(stop_after=3)  # a run stopped after 3 steps saves step 3 ...
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [3, 2]
    (tmp_path / "cut" / "ckpt_00000003.pt").unlink()  # ... "killed" before that save: step 2's survives
    del crashed
    resumed = Trainer(tiny(tmp_path / "cut"), quiet=True)
    assert resumed.step == 2
    resumed.train()
    _assert_same(_state(tmp_path / "full" / "ckpt_00000006.pt"), _state(tmp_path / "cut" / "ckpt_00000006.pt"))
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    steps = [int(line.split(",")[0].split(":")[1]) for line in lines]
    assert steps == [1, 2, 3, 4, 5, 6]  # the lost step 3 was logged once, after the resume


def test_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path, caplog):
    Trainer(tiny(tmp_path, num_training_steps=4), quiet=True).train()
    newest = tmp_path / "ckpt_00000004.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ckpt_00000004.pt is truncated or corrupt"):
        load_checkpoint(newest)
    path, ck = load_latest(tmp_path)
    assert path.name == "ckpt_00000002.pt" and ck["step"] == 2
    assert "falling back to the previous checkpoint" in caplog.text
    tr = Trainer(tiny(tmp_path, num_training_steps=4, seed=5), quiet=True)
    assert tr.step == 2 and tr.seed == 0  # a resume keeps the checkpoint's seed, not the config's 5
    assert torch.equal(torch.get_rng_state(), ck["rng"]["torch"])  # and the global generators' states
    assert np.array_equal(np.random.get_state()[1], ck["rng"]["numpy"]["key"].numpy())
    # the skipped file is set aside: a step saved before 4 is written again keeps the good one resumed from
    assert (tmp_path / "ckpt_00000004.pt.unreadable").exists()
    tr.train(stop_after=1)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3, 2]


def test_a_resume_with_another_global_batch_reads_on_from_where_the_run_stopped(tmp_path, monkeypatch):
    """The checkpoint keeps the data position (samples_seen): 2 steps of 4 samples, then one of 8 (twice the
    accumulations, as another number of processes would change it) reads samples 8-15, not 16-23."""
    import mdm_fast.train.trainer as trainer_module

    starts, make_loader = [], trainer_module.make_loader
    monkeypatch.setattr(trainer_module, "make_loader", lambda *a, **k: starts.append(k["start_position"])
                        or make_loader(*a, **k))
    Trainer(tiny(tmp_path, num_training_steps=2, save_freq=1), quiet=True).train()
    assert load_checkpoint(tmp_path / "ckpt_00000002.pt")["samples_seen"] == 8
    Trainer(tiny(tmp_path, num_training_steps=3, save_freq=1, num_gradient_accumulations=2), quiet=True).train()
    assert starts == [0, 8] and load_checkpoint(tmp_path / "ckpt_00000003.pt")["samples_seen"] == 16
    # a public file has no samples_seen: its batch_num steps of this run's global batch (4) were read
    public = tmp_path / "public.pt"
    torch.save({"state_dict": load_checkpoint(tmp_path / "ckpt_00000002.pt")["state_dict"], "batch_num": 2}, public)
    Trainer(tiny(tmp_path / "from_public", num_training_steps=3, pretrained_vision_file=str(public)),
            quiet=True).train()
    assert starts == [0, 8, 8]


def test_the_skipped_images_count_goes_on_after_a_resume(tmp_path):
    """metrics.jsonl's skipped_images counts the whole run: the checkpoint keeps it (it restarted at 0)."""
    tr = Trainer(tiny(tmp_path, num_training_steps=4, save_freq=1), quiet=True)
    tr.skipped = 7  # as if seven unreadable samples had been skipped
    tr.train(stop_after=1)
    assert load_checkpoint(tmp_path / "ckpt_00000001.pt")["skipped_images"] == 7
    assert Trainer(tiny(tmp_path, num_training_steps=4, save_freq=1), quiet=True).skipped == 7


def test_rng_state_round_trips_every_generator(tmp_path):
    """The RNG states stored in a checkpoint (tensors: weights_only loads them): after a restore the
    torch, Python and NumPy draws repeat those made after the capture, cached Gaussians included."""
    import random

    from mdm_fast.train.trainer import rng_state, set_rng_state

    def draws():
        return (torch.rand(3).tolist(), random.random(), random.gauss(0, 1), np.random.standard_normal(),
                np.random.rand())

    random.gauss(0, 1), np.random.standard_normal()  # each leaves the second Gaussian of a pair cached
    save_atomic({"state_dict": {}, "rng": rng_state()}, tmp_path / "ckpt_00000001.pt")
    first = draws()
    set_rng_state(load_checkpoint(tmp_path / "ckpt_00000001.pt")["rng"])
    assert draws() == first


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "ckpt_00000001.pt"
    save_atomic({"state_dict": {"w": torch.ones(3)}}, target)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"state_dict": {"w": torch.zeros(3)}}, target)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(target)["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000001.pt"]  # no temp file left


def test_an_image_interrupted_while_written_leaves_the_old_one(tmp_path, monkeypatch):
    from PIL import Image

    from mdm_fast.files import save_image_atomic

    target = tmp_path / "grid.png"
    save_image_atomic(Image.new("RGB", (4, 4), (255, 0, 0)), target)

    def interrupted(self, fp, *a, **k):
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_image_atomic(Image.new("RGB", (4, 4)), target)
    monkeypatch.undo()
    assert Image.open(target).getpixel((0, 0)) == (255, 0, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    with pytest.raises(ValueError, match="unknown image suffix"):
        save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "grid.nope")
    save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "GRID.PNG")  # the suffix in any case
    assert Image.open(tmp_path / "GRID.PNG").format == "PNG"


def test_an_atomic_write_is_synced_before_and_after_its_rename(tmp_path, monkeypatch):
    """write_atomic: the whole content is flushed and fsynced in a temporary file of the target's folder
    (made as needed) before os.replace publishes it, then the folder's entry is fsynced; text is UTF-8."""
    import stat

    from mdm_fast.files import write_text_atomic

    calls, fsync, replace = [], os.fsync, os.replace

    def spy_fsync(fd):
        st = os.fstat(fd)
        calls.append(("fsync", "folder" if stat.S_ISDIR(st.st_mode) else st.st_size))
        fsync(fd)

    def spy_replace(src, dst):
        calls.append(("replace", os.path.dirname(src) == os.path.dirname(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    target = tmp_path / "new" / "folder" / "log.txt"
    write_text_atomic(target, "012345678\u00e9")  # UTF-8: 11 bytes
    assert calls == [("fsync", 11), ("replace", True), ("fsync", "folder")]
    assert target.read_text(encoding="utf-8") == "012345678\u00e9"


def test_metrics_log_drops_a_torn_last_line_on_resume(tmp_path, caplog):
    from mdm_fast.train.metrics import MetricsLog

    log_ = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2):
        log_.write({"step": step, "loss": 0.5})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a crash while appending
    resumed = MetricsLog(tmp_path / "metrics.jsonl", resume_step=2)
    assert resumed.read() == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.5}]
    assert "torn last line" in caplog.text
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        resumed.read()
    assert MetricsLog(tmp_path / "metrics.jsonl").read() == []  # a fresh run (step 0) starts the log anew


def test_checkpoint_loads_into_the_public_model_layout(tmp_path):
    cfg = tiny(tmp_path, num_training_steps=2)
    Trainer(cfg, quiet=True).train()
    sd = torch.load(tmp_path / "ckpt_00000002.pt", weights_only=True)["state_dict"]
    model = build_model("nested_unet", cfg.unet_dict(10))
    model.load_state_dict(sd, strict=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_on_free_port(worker, *args, nprocs: int = 2, tries: int = 3) -> None:
    """``mp.spawn(worker, (nprocs, port, *args))`` on a port free a moment ago, up to ``tries`` times: again
    on a new port when another process bound it meanwhile (rank 0's store then fails to listen), and when a
    process was aborted (SIGABRT), with a warning. The abort, seen once in a whole `make test`: in the
    two-process sample test, rank 1, its files written, died in "terminate called without an active
    exception" (a C++ thread torn down unjoined) around the gloo group's end; never in 50 runs of that test
    alone. A try again writes into the folders the first wrote in (the trainer resumes there; sample
    writes the same files again)."""
    for attempt in range(tries):
        try:
            mp.spawn(worker, args=(nprocs, _free_port(), *args), nprocs=nprocs, join=True)
            return
        except mp.ProcessRaisedException as e:
            taken = "EADDRINUSE" in str(e) or "Address already in use" in str(e)  # libuv's store, the other
            if not taken or attempt == tries - 1:
                raise
        except mp.ProcessExitedException as e:
            if e.signal_name != "SIGABRT" or attempt == tries - 1:
                raise
            warnings.warn(f"{worker.__name__}: {e}; tried again", stacklevel=2)


def as_torchrun_rank(rank: int, world: int, port: int) -> None:
    """This spawned process as torchrun would start rank ``rank`` of ``world`` on one host (one thread)."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)


def _fails_once(rank, world, port, marker, message):
    if rank == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        if message == "abort":
            os.abort()
        raise RuntimeError(message)


def test_spawn_tries_again_when_the_port_was_taken_or_a_process_aborted(tmp_path):
    taken = "The server socket has failed to listen on any local network address. port: 1, code: -98, name: EADDRINUSE"
    spawn_on_free_port(_fails_once, str(tmp_path / "taken"), taken)  # the second try passes
    with pytest.raises(mp.ProcessRaisedException, match="a real failure"):
        spawn_on_free_port(_fails_once, str(tmp_path / "real"), "a real failure")  # not tried again
    with pytest.warns(UserWarning, match="SIGABRT; tried again"):
        spawn_on_free_port(_fails_once, str(tmp_path / "aborted"), "abort")  # the second try passes


# layers the public code builds and the forward never reads: the outer level's text embedding and
# interp_conditioning's layers (DDP waited for their gradients and failed at step 2)
UNUSED_OUTER = {**OUTER, "skip_cond_emb": False, "interp_conditioning": True}
# and dropout in every ResNet (the ranks drew the same masks)
QUIRKS_OUTER = {**UNUSED_OUTER, "resnet_config": {"num_groups_norm": 4, "dropout": 0.3},
                "inner_config": {**INNER, "resnet_config": {"num_groups_norm": 4, "dropout": 0.3}}}


def _two_process_cfg(out, mode, accumulations):
    """The tiny run of a two-process test; ddp-quirks: QUIRKS_OUTER on the test's 16 images (5 corrupt)."""
    over = {}
    if mode.endswith("quirks"):
        over = {"unet_config": QUIRKS_OUTER, "categorical_conditioning": 16,
                "file_list": str(Path(out).parent / "data" / "labels.tsv")}
    return tiny(out, num_training_steps=3, save_freq=3, batch_size=2, num_gradient_accumulations=accumulations,
                distributed=mode.split("-")[0], fp16=1, **over)


def _ddp_worker(rank, world, port, out, mode, acc):
    as_torchrun_rank(rank, world, port)
    try:
        Trainer(_two_process_cfg(out, mode, acc), quiet=True, graphed=mode.endswith("graphed")).train()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("mode,acc", [("ddp", 1), ("fsdp", 1), ("fsdp", 2), ("ddp-graphed", 2), ("ddp-quirks", 1)])
def test_two_processes_match_one_process(tmp_path, mode, acc):
    """One process reading both shards of each global batch (2x the accumulations) == 2 ranks (gloo, CPU):
    weights, optimizer state and metrics.jsonl (every rank's losses and skipped images, not rank 0's).
    acc 2: gradient accumulation on the ranks (no reduction but on the last micro-step). ddp-graphed:
    the graphed step's logic under DDP (the skip flag all-reduced too), without a graph. ddp-quirks: layers
    the forward never reads (DDP ignores them: unused_parameters), dropout (masks drawn per shard) and
    corrupt images. fp16: 1 (fp32 on a CPU) averages micro-batch gradients, as the ranks' all-reduce does;
    fp16: 0 sums them (the public code)."""
    _image_table(tmp_path / "data", 16, corrupt=(1, 5, 6, 9, 14))
    Trainer(_two_process_cfg(tmp_path / "one", mode, 2 * acc), quiet=True, graphed=mode.endswith("graphed")).train()
    spawn_on_free_port(_ddp_worker, str(tmp_path / "ddp"), mode, acc)
    logs = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "ddp")]
    skipped = [[r["skipped_images"] for r in log_] for log_ in logs]
    assert skipped[1] == skipped[0] and (skipped[0][-1] > 0) == mode.endswith("quirks")
    for a, b in zip(*logs):
        for k in ("loss", "loss_level0", "loss_level1", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4), k
    one = load_checkpoint(tmp_path / "one" / "ckpt_00000003.pt")
    ddp = load_checkpoint(tmp_path / "ddp" / "ckpt_00000003.pt")
    # fp32 summation order differs: across ranks (FSDP's reduce-scatter) ~2e-7 after 3 steps at lr 3e-3, with
    # accumulation (two partial sums all-reduced vs one sum of four) up to ~7e-6; a real mismatch (a wrong
    # shard, scaling, RNG or a missing/extra all-reduce) moves weights by about the learning rate
    atol = 2e-5 if acc > 1 else 1e-6
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][k], v, rtol=1e-5, atol=atol, msg=k)
    assert one["state_dict"]["conv_out.weight"].abs().sum() > 0  # trained (it starts at zero)
    # the optimizer state is stored whole, keyed by parameter name (FSDP gathers its shards): any world
    # size resumes from it
    sa, sb = one["optimizer"]["state"], ddp["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(name in one["state_dict"] for name in sa)
    for name in sa:
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb[name][k], sa[name][k], rtol=1e-4, atol=1e-9, msg=(name, k))


@pytest.mark.parametrize("fast", [False, True])
def test_unused_parameters_are_those_without_a_gradient(tmp_path, fast):
    """unused_parameters() names exactly the parameters a training step leaves without a gradient (the
    outer level's text embedding and interp layers here), for the reference and the fast model."""
    tr = Trainer(tiny(tmp_path, unet_config=UNUSED_OUTER, cond_drop_prob=0.0), quiet=True)
    model = tr.model if fast else build_model("nested_unet", tr.cfg.unet_dict(10))
    unused = model.unused_parameters()
    assert {"cond_emb.weight", "interp_layer1.weight", "interp_layer2.bias"} <= set(unused)
    batch = collate([tr.dataset[(i, 0)] for i in range(4)])
    cond, mask = tr.encoder.encode_batch(batch, tr.device)
    loss, _ = tr.diffusion.loss(model, to_model_range(batch["image"]), cond, mask)
    loss.backward()
    assert sorted(unused) == sorted(n for n, p in model.named_parameters() if p.grad is None)


def test_progressive_training_loads_and_freezes_the_inner_model(tmp_path):
    inner_cfg = tiny(tmp_path / "low", model="unet", unet_config={**INNER, "nesting": False},
                     diffusion_config={k: v for k, v in DIFFUSION.items()
                                       if k not in ("use_double_loss", "no_use_residual")},
                     reader_config={"image_size": 8, "num_readers": 0}, num_training_steps=2, cond_drop_prob=0.0)
    Trainer(inner_cfg, quiet=True).train()
    low = load_checkpoint(tmp_path / "low" / "ckpt_00000002.pt")["state_dict"]
    outer = {**OUTER, "initialize_inner_with_pretrained": str(tmp_path / "low" / "ckpt_00000002.pt"),
             "freeze_inner_unet": True}
    tr = Trainer(tiny(tmp_path / "high", unet_config=outer, num_training_steps=2), quiet=True)
    inner = tr.model.inner_unet.state_dict()
    assert all(torch.equal(inner[k], low[k]) for k in low)
    outer_before = {k: v.clone() for k, v in tr.model.state_dict().items() if not k.startswith("inner_unet.")}
    tr.train()
    assert all(torch.equal(tr.model.inner_unet.state_dict()[k], low[k]) for k in low)  # frozen
    assert any(not torch.equal(tr.model.state_dict()[k], v) for k, v in outer_before.items())  # trained


@pytest.mark.parametrize("flag", [False, True], ids=["host", "device-flag"])
def test_ema_follows_the_public_semantics(flag):
    """The public ModelEma formula (decay 0 for the first warmup_steps updates, then ema = d * ema + (1 - d)
    * w), in fp64, over the updates that were made: an update flagged skipped on the device (host: not
    called) leaves the EMA and its warm-up count as they were; integer buffers are copied (the public
    mul_ fails on them); decay bounds [0, 1]."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))  # + int num_batches_tracked
    ema = ModelEma(model, decay=0.75, warmup_steps=2)
    want = {k: v.double().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    made = 0
    for skip in (0, 1, 0, 0, 1, 0):  # a skip during the warm-up and one after it
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model(torch.randn(4, 3))  # train mode: the running stats and the int counter move too
        if flag:
            ema.update(model, skipped=torch.tensor(float(skip)))
        elif not skip:
            ema.update(model)
        if not skip:
            d = 0.75 if made >= 2 else 0.0
            want = {k: d * v + (1 - d) * model.state_dict()[k].double() for k, v in want.items()}
            made += 1
    assert ema.count_on_host() == made == 4
    ema.set_count(7)  # a resume's count replaces every earlier one, the device's skips included
    assert ema.count_on_host() == 7
    for k, v in ema.module.state_dict().items():
        if k in want:
            torch.testing.assert_close(v.double(), want[k], rtol=0, atol=1e-6, msg=k)
        else:  # num_batches_tracked
            assert v.dtype == torch.int64 and torch.equal(v, model.state_dict()[k]), k
    for decay in (0.0, 1.0):
        ModelEma(model, decay=decay)
    for decay in (-0.1, 1.5):
        with pytest.raises(ValueError, match="ema_decay"):
            ModelEma(model, decay=decay)


def _first_step_gradients(out, graphed, monkeypatch, **over):
    """The gradients of a fresh run's first step (two micro-batches), as clipping sees them."""
    tr = Trainer(tiny(out, num_gradient_accumulations=2, cond_drop_prob=0.0, **over), quiet=True, graphed=graphed)
    seen, clip = [], torch.nn.utils.clip_grad_norm_

    def spy(params, *args, **kwargs):
        seen.extend(p.grad.clone() for p in params)
        return clip(params, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch.nn.utils, "clip_grad_norm_", spy)
        tr.train_step([collate([tr.dataset[(4 * k + i, 0)] for i in range(4)]) for k in range(2)])
    return seen


@pytest.mark.parametrize("graphed", [False, True])
def test_accumulation_and_loss_factor_follow_the_public_branch_fp16_picks(tmp_path, monkeypatch, graphed):
    """The public train_batch: with fp16 the loss is multiplied by loss_factor and divided by the
    accumulations before backward (gradients averaged); without, the micro-batch gradients are summed
    and loss_factor is unused (checked side by side with the public code: equal weights over 5 steps)."""
    mean = _first_step_gradients(tmp_path / "mean", graphed, monkeypatch, fp16=1)
    summed = _first_step_gradients(tmp_path / "sum", graphed, monkeypatch, fp16=0, loss_factor=3.0)
    scaled = _first_step_gradients(tmp_path / "scaled", graphed, monkeypatch, fp16=1, loss_factor=3.0)
    assert any(g.abs().sum() > 0 for g in mean)
    for m, s, f in zip(mean, summed, scaled):
        torch.testing.assert_close(s, 2 * m, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(f, 3 * m, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("graphed", [False, True])
def test_first_steps_are_adamw_on_clipped_gradients_at_the_warm_up_rate_then_the_ema(tmp_path, monkeypatch, graphed):
    """The optimizer step against an fp64 oracle: the gradients the optimizer sees are the micro-batches'
    clipped to gradient_clip_norm (coefficient clip / (norm + 1e-6), the norm logged before clipping);
    Adam's first update is lr * warm-up factor (1/2 at step 0) * g / (|g| + 1e-8), without weight decay;
    the EMA (ema_warmup_steps 1) is then a copy of the updated weights, and after step 2 decay * those + (1 -
    decay) * the new weights (it follows the optimizer step)."""
    tr = Trainer(tiny(tmp_path, num_gradient_accumulations=2, cond_drop_prob=0.0, gradient_clip_norm=0.05,
                      ema_warmup_steps=1), quiet=True, graphed=graphed)
    batches = [collate([tr.dataset[(4 * k + i, 0)] for i in range(4)]) for k in range(2)]  # image (4, 16, 16, 3)
    names = [n for n, p in tr.model.named_parameters() if p.requires_grad]
    seen, clip = {}, torch.nn.utils.clip_grad_norm_

    def spy_clip(params, *args, **kwargs):
        seen["raw"] = [p.grad.double() for p in params]
        return clip(params, *args, **kwargs)

    def spy_step(*_):
        seen.setdefault("clipped", [p.grad.clone() for p in tr.params])

    tr.optimizer.register_step_pre_hook(spy_step)
    before = [p.detach().double() for p in tr.params]
    with monkeypatch.context() as m:
        m.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)
        stats, ok = tr.train_step(batches)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in seen["raw"]]))
    assert float(ok) == 1.0 and norm > 0.05  # clipping acts
    assert float(stats["grad_norm"]) == pytest.approx(norm.item(), rel=1e-5)
    assert float(stats["lr"]) == pytest.approx(3e-3 / 2)
    coef = 0.05 / (norm + 1e-6)
    for name, g, c in zip(names, seen["raw"], seen["clipped"]):
        torch.testing.assert_close(c.double(), g * coef, rtol=1e-5, atol=1e-12, msg=name)
    for name, p0, g, p in zip(names, before, seen["raw"], tr.params):
        want = p0 - 3e-3 / 2 * (g * coef) / ((g * coef).abs() + 1e-8)
        torch.testing.assert_close(p.detach().double(), want, rtol=0, atol=1e-7, msg=name)
    ema = dict(tr.ema.module.named_parameters())
    first = {n: p.detach().clone() for n, p in zip(names, tr.params)}
    assert all(torch.equal(ema[n], v) for n, v in first.items())  # the warm-up update: a copy
    tr.train_step(batches)
    for n, p in zip(names, tr.params):
        torch.testing.assert_close(ema[n].double(), 0.9 * first[n].double() + 0.1 * p.detach().double(),
                                   rtol=0, atol=1e-7, msg=n)


@pytest.mark.parametrize("flag", [False, True], ids=["host", "device-flag"])
def test_log_window_means_cover_the_kept_steps_only(flag):
    """A log line's stats are the means over the steps whose update was made (a skipped step's NaN loss
    adds nothing, and does not count in the divisor); the skipped steps are counted for the warning."""
    from mdm_fast.train.trainer import _Window

    w = _Window()
    for loss, ok in ((1.0, 1.0), (float("nan"), 0.0), (4.0, 1.0), (float("inf"), 0.0)):
        w.add({"loss": torch.tensor(loss) if flag else loss}, torch.tensor(ok) if flag else ok)
    means, skipped = w.means()
    assert means == {"loss": 2.5} and skipped == 2 and w.steps == 4
    w = _Window()
    w.add({"loss": float("nan")}, 0.0)
    assert w.means() == ({}, 1)  # nothing kept: no log line


def test_a_log_line_every_log_freq_steps_and_at_the_last_holds_its_window_means(tmp_path):
    """log_freq 4 over 6 steps, stopped by a past deadline after step 1, by stop_after at step 3, resumed
    each time: lines at steps 1 and 3 (where a run stops, it logs its partial window), 4 and 6 (the last
    step logs whatever log_freq says), each the mean of a log_freq 1 run's lines over its window, which
    it counts in ``steps``; images_per_s counts every micro-batch (window steps x batch_size x accumulations
    per second)."""
    logs = {}
    for freq in (1, 4):
        cfg = tiny(tmp_path / str(freq), log_freq=freq, num_gradient_accumulations=2, save_freq=6)
        if freq == 4:
            Trainer(cfg, quiet=True).train(deadline=0.0)
            Trainer(cfg, quiet=True).train(stop_after=2)
        Trainer(cfg, quiet=True).train()
        logs[freq] = [json.loads(x) for x in (tmp_path / str(freq) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs[4]] == [1, 3, 4, 6]
    for r, (lo, hi) in zip(logs[4], ((0, 1), (1, 3), (3, 4), (4, 6))):
        for k in ("loss", "loss_level0", "loss_level1", "grad_norm", "lr"):
            assert r[k] == pytest.approx(np.mean([e[k] for e in logs[1][lo:hi]]), rel=1e-6), k
        assert r["steps"] == hi - lo  # a run's first window, after a resume too, is short
        assert r["images_per_s"] * r["time_s"] == pytest.approx((hi - lo) * 4 * 2, rel=0.02)


def test_conditioning_dropout_replaces_the_drawn_samples_by_the_null(tmp_path):
    """cond_drop_prob p: a sample's conditioning is the encoder's null (zeros, one unmasked token, for
    class labels) where its uniform draw from the step's generator is below p: every sample at p = 1."""
    for p in (0.25, 1.0):
        tr = Trainer(tiny(tmp_path / str(p), cond_drop_prob=p), quiet=True)
        batch = collate([tr.dataset[(i, 0)] for i in range(8)])
        cond, mask = tr.encoder.encode_batch(batch, tr.device)  # (B, 1, 10), (B, 1)
        got, got_mask = tr._conditioning(batch, torch.Generator().manual_seed(3))
        drop = torch.rand(8, generator=torch.Generator().manual_seed(3)) < p  # (B,)
        assert drop.all() if p == 1 else 0 < drop.sum() < 8
        torch.testing.assert_close(got, torch.where(drop[:, None, None], 0.0, cond), rtol=0, atol=0)
        assert torch.equal(got_mask, mask)


def test_every_micro_batch_and_step_draws_its_own_noise(tmp_path):
    """The step generator is re-seeded per micro-batch from (seed, step, shard): the micro-batches of a
    step and the same micro-batch of another step all draw different noise and dropout."""
    tr = Trainer(tiny(tmp_path, num_gradient_accumulations=2), quiet=True)
    batch = collate([tr.dataset[(i, 0)] for i in range(4)])
    draws = []
    for step in (0, 1):
        tr.step = step
        for micro in (0, 1):
            tr._micro_inputs(batch, micro)
            draws.append(torch.rand(8, generator=tr.generator))  # (8,)
    assert all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[:i])


def test_bad_configs_and_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no training data"):
        Trainer(tiny(tmp_path, file_list=""), quiet=True)
    with pytest.raises(ValueError, match="num_gradient_accumulations"):
        tiny(tmp_path, num_gradient_accumulations=0)
    with pytest.raises(ValueError, match="text_encoder"):
        Trainer(tiny(tmp_path, text_encoder="bert9000"), quiet=True)
    with pytest.raises(ValueError, match="distributed"):
        tiny(tmp_path, distributed="horovod")
    with pytest.raises(ValueError, match="cuda_graphs"):
        tiny(tmp_path, cuda_graphs="sometimes")
    with pytest.raises(ValueError, match="cuda_graphs: on needs one process or DDP on a CUDA device"):
        Trainer(tiny(tmp_path, cuda_graphs="on"), device=torch.device("cpu"), quiet=True)
    (tmp_path / "cap.tsv").write_text("file\tcaption\n")
    with pytest.raises(ValueError, match="no rows"):
        Trainer(tiny(tmp_path, file_list=str(tmp_path / "cap.tsv")), quiet=True)
    for field, value, bound in (("gradient_clip_norm", 0, "> 0"), ("gradient_clip_norm", -1, "> 0"),
                                ("lr", 0.0, "> 0"), ("cond_drop_prob", 1.5, ">= 0 and <= 1"), ("log_freq", 0, ">= 1"),
                                ("save_freq", 0, ">= 1"), ("keep_checkpoints", 1, ">= 2")):
        with pytest.raises(ValueError, match=f"{field}: expected {bound}"):
            tiny(tmp_path, **{field: value})
    with pytest.raises(ValueError, match="pretrained_vision_file: no file"):
        Trainer(tiny(tmp_path / "fresh", pretrained_vision_file=str(tmp_path / "missing.pt")), quiet=True)
    inner = {**OUTER, "initialize_inner_with_pretrained": str(tmp_path / "low.pt")}
    with pytest.raises(ValueError, match="unet_config.initialize_inner_with_pretrained: no file"):
        Trainer(tiny(tmp_path / "fresh", unet_config=inner), quiet=True)
    emb = tmp_path / "emb.npz"
    np.savez(emb, images=np.zeros((4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="sample_freq"):
        Trainer(tiny(tmp_path / "fresh", file_list=str(emb), categorical_conditioning=0,
                     use_precomputed_text_embeddings=1, text_dim=6, sample_freq=2), quiet=True)


def test_starting_from_weights_without_ema_a_new_lr_and_a_stop_after_steps(tmp_path):
    """A converted public file (weights, batch_num, no EMA) as pretrained_vision_file or in the output
    folder: the EMA starts from its weights; a resume with a new lr trains at it; a run stopped after
    --steps N, or by a deadline already past after one step, leaves its checkpoint."""
    Trainer(tiny(tmp_path / "src", num_training_steps=2), quiet=True).train()
    src = load_checkpoint(tmp_path / "src" / "ckpt_00000002.pt")
    public = tmp_path / "public.pt"
    torch.save({"state_dict": src["ema_state_dict"], "batch_num": 2}, public)
    tr = Trainer(tiny(tmp_path / "run", num_training_steps=10, save_freq=100, pretrained_vision_file=str(public)),
                 quiet=True)
    assert tr.step == 2
    for name, value in src["ema_state_dict"].items():
        assert torch.equal(tr.model.state_dict()[name], value) and torch.equal(tr.ema.module.state_dict()[name], value)
    tr.train(stop_after=1)
    assert [p.name for p in sorted((tmp_path / "run").glob("ckpt_*.pt"))] == ["ckpt_00000003.pt"]
    tr = Trainer(tiny(tmp_path / "run", num_training_steps=10, save_freq=100, warmup_steps=10, lr=1e-5), quiet=True)
    # the public LRScaler, at the new rate, one step into a 10-step warm-up (it restarted at the pretrained start)
    lr = 1e-5 * 1 / 10
    assert tr.step == 3 and tr.optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    assert tr.scheduler.get_last_lr() == [pytest.approx(lr)]
    tr.train(stop_after=1)
    assert load_checkpoint(tmp_path / "run" / "ckpt_00000004.pt")["scheduler"]["base_lrs"] == [1e-5]
    assert tr.train(deadline=0.0)["step"] == 5 and load_latest(tmp_path / "run")[1]["step"] == 5  # past: one step
    # resume_from_ema: the model starts from a checkpoint's EMA weights
    tr = Trainer(tiny(tmp_path / "ema", pretrained_vision_file=str(tmp_path / "src" / "ckpt_00000002.pt"),
                      resume_from_ema=True), quiet=True)
    assert all(torch.equal(tr.model.state_dict()[k], v) for k, v in src["ema_state_dict"].items())


def test_saved_files_follow_the_umask_and_unreadable_checkpoints_are_set_aside(tmp_path, caplog):
    """Checkpoints get the mode open() gives; a file the resume skipped as unreadable is renamed *.unreadable
    and counts for nothing, so rotation keeps the good one it resumed from; the newest keep_checkpoints are
    kept, never fewer than two; a write a kill interrupted leaves no temporary file past the next save."""
    from mdm_fast.train.checkpoint import save_rotating

    old = os.umask(0o022)
    try:
        save_rotating({"state_dict": {}}, tmp_path, 1)
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt_00000001.pt").stat().st_mode & 0o777 == 0o644
    (tmp_path / "ckpt_00000002.pt").write_bytes(b"torn")
    assert load_latest(tmp_path)[0].name == "ckpt_00000001.pt"  # without set_aside: reported only
    assert (tmp_path / "ckpt_00000002.pt").exists() and "falling back" in caplog.text
    assert load_latest(tmp_path, set_aside=True)[0].name == "ckpt_00000001.pt"
    assert (tmp_path / "ckpt_00000002.pt.unreadable").read_bytes() == b"torn" and "unreadable" in caplog.text
    (tmp_path / "ckpt_00000003.pt.k2j4x_1a.tmp").write_bytes(b"half")  # killed while writing step 3
    save_rotating({"state_dict": {}}, tmp_path, 3)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3, 1]  # the set-aside file took no place
    assert not list(tmp_path.glob("*.tmp"))
    for step, keep, kept in ((4, 3, [4, 3, 1]), (5, 3, [5, 4, 3]), (6, 1, [6, 5])):  # keep 1: the previous stays
        save_rotating({"state_dict": {}}, tmp_path, step, keep)
        assert [s for s, _ in list_checkpoints(tmp_path)] == kept, keep


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_a_second_aborts(tmp_path, signame, monkeypatch):
    """Ctrl-C or a preemption notice (one process): the step under way ends, a checkpoint is written there
    (save_freq far off), the handlers are put back; a second signal aborts at once, but not under a
    one-rank torchrun, whose launcher forwards the signal again."""
    import signal

    sig = getattr(signal, signame)
    before = signal.getsignal(sig)
    tr = Trainer(tiny(tmp_path / "one", num_training_steps=10, save_freq=100, sample_freq=1), quiet=True)
    result = tr.train(sample_fn=lambda trainer: os.kill(os.getpid(), sig))  # after step 1: step 2 ends the run
    assert result["step"] == 2 and [s for s, _ in list_checkpoints(tmp_path / "one")] == [2]
    assert signal.getsignal(sig) is before

    def twice(trainer):
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), sig)

    tr = Trainer(tiny(tmp_path / "two", num_training_steps=10, save_freq=100, sample_freq=1), quiet=True)
    with pytest.raises(KeyboardInterrupt, match=f"{signame} again: aborted"):
        tr.train(sample_fn=twice)
    assert not list_checkpoints(tmp_path / "two") and signal.getsignal(sig) is before
    # a one-rank torchrun: the launcher forwards the signal the rank may have had already; a repeat is ignored
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    tr = Trainer(tiny(tmp_path / "torchrun", num_training_steps=10, save_freq=100, sample_freq=1), quiet=True)
    assert tr.train(sample_fn=twice)["step"] == 2 and [s for s, _ in list_checkpoints(tmp_path / "torchrun")] == [2]


def _disagreeing_worker(rank, world, port, out):
    from mdm_fast.train.distributed import check_ranks_agree, init_distributed

    as_torchrun_rank(rank, world, port)
    try:
        info = init_distributed()
        check_ranks_agree(info, resume_step=6, dataset_length=6)  # agreed: nothing happens
        with pytest.raises(ValueError, match=r"the ranks disagree on dataset_length: \[1797, 1000\] \(rank 0 "
                                             r"first\); every rank must see the same output_dir"):
            check_ranks_agree(info, resume_step=6, dataset_length=[1797, 1000][rank])
        with open(os.path.join(out, f"raised_{rank}"), "w"):
            pass
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_that_disagree_on_their_start_all_raise(tmp_path):
    """Ranks resuming from different steps (an output_dir not shared) hung at their first collective, and
    datasets of other lengths overlapped their shards silently: every rank raises, naming the values."""
    spawn_on_free_port(_disagreeing_worker, str(tmp_path))
    assert (tmp_path / "raised_0").exists() and (tmp_path / "raised_1").exists()


def _stopping_worker(rank, world, port, out, how):
    """Rank 1 alone meets the stop: two SIGTERMs during step 1 (its own and the launcher's forward), or a
    deadline already past; rank 0 neither. Each rank writes the step it stopped at."""
    import signal

    as_torchrun_rank(rank, world, port)
    try:
        tr = Trainer(tiny(out, num_training_steps=10, save_freq=100), quiet=True)
        if rank == 1 and how == "signal":
            step = tr.train_step

            def signalled_step(batches):
                if tr.step == 0:
                    os.kill(os.getpid(), signal.SIGTERM)
                    os.kill(os.getpid(), signal.SIGTERM)
                return step(batches)

            tr.train_step = signalled_step
        result = tr.train(deadline=0.0 if rank == 1 and how == "deadline" else None)
        with open(os.path.join(out, f"stopped_{rank}"), "w") as f:
            f.write(str(result["step"]))
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("how", ["signal", "deadline"])
def test_under_torchrun_one_ranks_signal_or_deadline_stops_every_rank_at_one_step(tmp_path, how):
    """Under torchrun a preemption's SIGTERM (possibly twice: the scheduler's and the launcher's forward)
    or a time limit seen by one rank stops all of them after the same step, with a checkpoint there."""
    spawn_on_free_port(_stopping_worker, str(tmp_path), how)
    assert [(tmp_path / f"stopped_{rank}").read_text() for rank in (0, 1)] == ["1", "1"]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1]


def test_a_schedulers_sigterm_to_the_whole_job_stops_with_a_checkpoint(tmp_path):
    """SIGTERM to every process of the job (a scheduler's, as a one-rank torchrun gets it) while loader workers
    run: the run stops after the step under way with a checkpoint and exits 0 (the workers died of it and
    failed the step), and the workers end (they ignore SIGTERM: the trainer shuts them down)."""
    import signal
    import subprocess
    import sys
    import time

    cfg = tiny(tmp_path / "run", num_training_steps=100_000, save_freq=100_000, reader_config={
        "image_size": 16, "num_readers": 1})
    cfg.to_yaml(tmp_path / "run.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHELASTIC_RUN_ID": "test"}
    proc = subprocess.Popen([sys.executable, "-m", "mdm_fast.cli.main", "train", "--config",
                             str(tmp_path / "run.yaml")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 120
        while proc.poll() is None and time.time() < deadline and not (
                metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.05)
        for _ in range(2):  # the trainer and its loader worker, twice in a row (they may arrive as one)
            os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = proc.stderr.read().decode()
    assert rc == 0, err[-2000:]
    assert list_checkpoints(tmp_path / "run"), err[-2000:]


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    cfg = tiny(tmp_path / "killed", num_training_steps=10_000, save_freq=1, keep_checkpoints=3)
    cfg.to_yaml(tmp_path / "run.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mdm_fast.cli.main", "train",
                             "--config", str(tmp_path / "run.yaml")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while len(list_checkpoints(tmp_path / "killed")) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up, possibly in the middle of a write
    finally:
        proc.wait()
    path, ck = load_latest(tmp_path / "killed")
    k = ck["step"]
    assert k >= 2
    resumed = Trainer(tiny(tmp_path / "killed", num_training_steps=k + 2, save_freq=1), quiet=True)
    assert resumed.step == k
    resumed.train()
    Trainer(tiny(tmp_path / "straight", num_training_steps=k + 2, save_freq=1), quiet=True).train()
    _assert_same(load_checkpoint(tmp_path / "straight" / f"ckpt_{k + 2:08d}.pt"),
                 load_checkpoint(tmp_path / "killed" / f"ckpt_{k + 2:08d}.pt"))


# ---- the graphed step (its logic without a graph on the CPU; replay on a GPU in test_runners) ----


def test_yaml_on_off_read_as_cuda_graphs_modes(tmp_path):
    assert tiny(tmp_path, cuda_graphs=True).cuda_graphs == "on"  # YAML 1.1 reads `on` as true
    assert tiny(tmp_path, cuda_graphs=False).cuda_graphs == "off"


@pytest.mark.parametrize("mode,device,world,dist,want", [
    ("auto", "cuda", 1, "ddp", True), ("auto", "cuda", 2, "ddp", False), ("auto", "cpu", 1, "ddp", False),
    ("on", "cuda", 2, "ddp", True), ("on", "cuda", 2, "fsdp", ValueError), ("on", "cpu", 1, "ddp", ValueError),
    ("off", "cuda", 1, "ddp", False)])
def test_cuda_graphs_modes_pick_the_graphed_step(tmp_path, mode, device, world, dist, want):
    """cuda_graphs: auto graphs one process on a CUDA device only; on also graphs DDP ranks and refuses
    FSDP or a CPU; off never graphs (the choice alone: no device needed)."""
    from types import SimpleNamespace

    from mdm_fast.train.distributed import DistInfo

    stub = SimpleNamespace(cfg=tiny(tmp_path, cuda_graphs=mode, distributed=dist), device=torch.device(device),
                           dist=DistInfo(0, world, 0))
    if want is ValueError:
        with pytest.raises(ValueError, match="cuda_graphs: on needs"):
            Trainer._graphed_wanted(stub)
    else:
        assert Trainer._graphed_wanted(stub) is want


def _close(a, b, rtol, atol):
    for key in ("state_dict", "ema_state_dict"):
        for k in a[key]:
            assert torch.allclose(a[key][k].float(), b[key][k].float(), rtol=rtol, atol=atol), (key, k)


@pytest.mark.parametrize("acc", [1, 2])
def test_graphed_step_logic_matches_the_eager_step(tmp_path, acc):
    """The sync-free step (device-side skip flag, fused AdamW, device-side EMA and logging) computes
    the eager step's numbers: same draws, same losses logged; the fused optimizer rounds differently."""
    runs = {}
    for graphed in (False, True):
        out = tmp_path / str(graphed)
        tr = Trainer(tiny(out, num_gradient_accumulations=acc), quiet=True, graphed=graphed)
        assert (tr.graphed is not None) == graphed
        result = tr.train()
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[graphed] = (load_checkpoint(out / "ckpt_00000006.pt"), lines, result)
    (eager, eager_log, eager_res), (fast, fast_log, fast_res) = runs[False], runs[True]
    _close(eager, fast, 1e-4, 1e-5)
    assert [r["step"] for r in eager_log] == [r["step"] for r in fast_log] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(eager_log, fast_log):
        for k in ("loss", "loss_level0", "loss_level1", "grad_norm", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), k
    assert eager["ema"]["counter"] == fast["ema"]["counter"] == 6
    assert fast_res["last"]["loss"] == pytest.approx(eager_res["last"]["loss"], rel=1e-4)


def test_an_eager_checkpoint_resumes_on_the_graphed_step(tmp_path):
    """Checkpoints are the same format either way: an eager run's step-2 checkpoint, resumed by the
    graphed step (fused AdamW), reaches what an uninterrupted graphed run reaches."""
    Trainer(tiny(tmp_path / "mixed"), quiet=True, graphed=False).train(stop_after=2)
    resumed = Trainer(tiny(tmp_path / "mixed"), quiet=True, graphed=True)
    assert resumed.step == 2 and resumed.graphed is not None
    resumed.train()
    Trainer(tiny(tmp_path / "graphed"), quiet=True, graphed=True).train()
    a, b = (load_checkpoint(tmp_path / d / "ckpt_00000006.pt") for d in ("mixed", "graphed"))
    _close(a, b, 1e-4, 1e-5)
    assert a["ema"]["counter"] == b["ema"]["counter"] == 6


class _InfiniteGradient(torch.autograd.Function):
    """0 forward; an infinite gradient for its input backward (a finite loss with a non-finite gradient)."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        return g.new_full(ctx.shape, float("inf"))


def _poison(loss, what, params):
    if what == "loss":
        return loss * float("nan")
    return loss + _InfiniteGradient.apply(params[0].sum())


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_graphed_step_skips_a_non_finite_loss_as_the_eager_step_does(tmp_path, caplog, what):
    """A NaN loss at step 3, or a finite loss with an infinite gradient: no update, the EMA and its warm-up
    count untouched, the step and the learning-rate warm-up still counted, the log line of that step absent
    (log_freq 1) and a warning (the eager step's names what was not finite); decided on the device."""
    states = {}
    for graphed in (False, True):
        tr = Trainer(tiny(tmp_path / str(graphed), ema_warmup_steps=3, warmup_steps=10), quiet=True, graphed=graphed)
        loss_fn = tr._loss

        def poisoned(images, cond, mask, tr=tr, loss_fn=loss_fn):
            loss, stats = loss_fn(images, cond, mask)
            return (_poison(loss, what, tr.params) if tr.step == 2 else loss), stats

        if graphed:
            tr.graphed.loss_fn = poisoned
        else:
            tr._loss = poisoned
        with caplog.at_level("WARNING"):
            tr.train()
        assert "skip" in caplog.text
        assert graphed or f"step 2: {'loss' if what == 'loss' else 'gradient norm'} is not finite" in caplog.text
        caplog.clear()
        lines = [json.loads(x) for x in (tmp_path / str(graphed) / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [1, 2, 4, 5, 6]
        assert [r["lr"] for r in lines] == pytest.approx([3e-3 * max(1, r["step"] - 1) / 10 for r in lines])
        states[graphed] = load_checkpoint(tmp_path / str(graphed) / "ckpt_00000006.pt")
        assert states[graphed]["ema"]["counter"] == 5
        assert all(int(s["step"]) == 5 for s in states[graphed]["optimizer"]["state"].values())
    _close(states[False], states[True], 1e-4, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("acc,bf16", [(1, 0), (2, 1)])
def test_gpu_graph_replayed_training_equals_the_same_step_run_eagerly(tmp_path, monkeypatch, acc, bf16):
    """cuda_graphs: auto on one GPU captures the micro-step; replaying it gives the numbers of the same
    step run without a graph (same kernels, same noise draws: the step generator is graph-registered).
    cuDNN is held to deterministic algorithms: its default fp32 weight-gradient ones may accumulate
    with atomics, which Adam's normalised steps turn into differences of 1e-4 after six steps."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    runs = {}
    for capture in (True, False):
        out = tmp_path / str(capture)
        tr = Trainer(tiny(out, num_gradient_accumulations=acc, fp16=bf16), device=torch.device("cuda"), quiet=True)
        assert tr.graphed is not None and tr.graphed.runner.capture
        tr.graphed.runner.capture = capture
        tr.train()
        assert tr.graphed.runner.num_graphs == acc and tr.graphed.eager_calls == 0  # acc 2: all-reduce or not
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[capture] = (load_checkpoint(out / "ckpt_00000006.pt"), lines)
    for a, b in zip(runs[True][1], runs[False][1]):  # first: a wrong draw or a lost micro-batch shows here
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["step"] == b["step"], (a, b)
    _close(runs[True][0], runs[False][0], 1e-5, 1e-6)


def test_a_capture_mid_step_keeps_the_gradients_and_sums_so_far(tmp_path):
    """A new batch signature met on a later micro-step is captured there: its warm-up runs (which
    accumulate) must leave the earlier micro-steps' gradients and loss sums as they were."""
    from mdm_fast.data import make_loader

    tr = Trainer(tiny(tmp_path, num_gradient_accumulations=2), quiet=True, graphed=True)
    step = tr.graphed
    batch = next(iter(make_loader(tr.dataset, 4, rank=0, world_size=1, accumulations=1, seed=0, start_step=0,
                                  num_steps=1)))
    step.micro_step(*tr._micro_inputs(batch, 0), last=False)
    grads = [p.grad.clone() for p in step.params]
    sums = {k: v.clone() for k, v in step._sums.items()}
    step._save()
    for _ in range(2):  # what a capture's warm-up does
        step._micro(True, *tr._micro_inputs(batch, 1))
    step._restore()
    assert all(torch.equal(p.grad, g) for p, g in zip(step.params, grads))
    assert all(torch.equal(step._sums[k], v) for k, v in sums.items())


@needs_minilm
@pytest.mark.parametrize("pad", [False, True], ids=["longest", "max-length"])
def test_captioned_training_with_a_text_encoder(tmp_path, monkeypatch, pad):
    """Captions of several lengths through MiniLM (offline), conditioning dropout, the graphed step's
    logic against the eager step: the same losses (each batch padded to its longest caption, or to
    max_token_length)."""
    from PIL import Image

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    words = "a small red square on a blue field at dusk with a cat".split()
    rows = ["file\tcaption"]
    for i in range(8):
        Image.new("RGB", (16, 16), (30 * i, 100, 200 - 20 * i)).save(tmp_path / f"img{i}.png")
        rows.append(f"img{i}.png\t{' '.join(words[:2 + i])}")
    (tmp_path / "captions.tsv").write_text("\n".join(rows) + "\n")
    logs = {}
    for graphed in (False, True):
        out = tmp_path / str(graphed)
        cfg = tiny(out, file_list=str(tmp_path / "captions.tsv"), categorical_conditioning=0, text_model="minilm",
                   reader_config={"image_size": 16, "num_readers": 0, "max_token_length": 16,
                                  "pad_to_max_length": pad},
                   num_training_steps=3, save_freq=3)
        Trainer(cfg, quiet=True, graphed=graphed).train()
        logs[graphed] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs[True]] == [1, 2, 3]
    for a, b in zip(logs[False], logs[True]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and math.isfinite(a["loss"])


@needs_minilm
def test_trainer_drops_captions_over_max_token_length(tmp_path, monkeypatch):
    """The trainer hands its encoder's tokenizer to the dataset: a caption of more than max_token_length
    tokens drops its sample, as the public reader does (it used to be cut by the encoder); the others
    carry their ids."""
    from PIL import Image

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = ["file\tcaption"]
    for i, caption in enumerate(["a red car", "a small red car parked on a quiet street at night", "a dog"]):
        Image.new("RGB", (16, 16), (60 * i, 100, 50)).save(tmp_path / f"img{i}.png")
        rows.append(f"img{i}.png\t{caption}")
    (tmp_path / "captions.tsv").write_text("\n".join(rows) + "\n")
    cfg = tiny(tmp_path / "out", file_list=str(tmp_path / "captions.tsv"), categorical_conditioning=0,
               text_model="minilm", reader_config={"image_size": 16, "num_readers": 0, "max_token_length": 8})
    trainer = Trainer(cfg, quiet=True)
    ds = trainer.dataset
    assert ds[(0, 0)]["caption"] == "a red car" and ds[(0, 0)]["_skipped"] == 0
    s = ds[(1, 0)]  # 12 tokens with [CLS] and [SEP]
    assert s["caption"] == "a dog" and s["_skipped"] == 1
    assert s["caption_ids"] == trainer.encoder.caption_tokenizer()("a dog") and len(s["caption_ids"]) == 4


def test_ddp_for_capture_is_built_on_a_side_stream(tmp_path, monkeypatch):
    """wrap_model(for_capture=True): DDP built inside engine.side_stream (a stand-in here: no CUDA) with its
    runtime-stats sampling off; a one-rank gloo group stands in for several."""
    from contextlib import contextmanager

    import mdm_fast.train.distributed as distributed
    from mdm_fast.train.distributed import DistInfo, wrap_model

    entered, rates = [], []

    @contextmanager
    def stand_in():
        entered.append(1)
        yield

    monkeypatch.setattr(distributed, "side_stream", stand_in)
    monkeypatch.setattr(torch.nn.parallel.DistributedDataParallel, "_set_ddp_runtime_logging_sample_rate",
                        lambda self, rate: rates.append(rate))
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = wrap_model(torch.nn.Linear(3, 2), DistInfo(0, 2, 0), "ddp", for_capture=True)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and entered == [1]
        assert len(rates) == 1 and rates[0] >= 2 ** 31 - 1  # no timed iteration ever again
        assert isinstance(wrap_model(torch.nn.Linear(3, 2), DistInfo(0, 2, 0), "ddp"),
                          torch.nn.parallel.DistributedDataParallel) and entered == [1]
        del ddp  # before the group (see test_cast_each_call_through_ddp)
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_units_are_the_blocks_of_every_level(tmp_path):
    """FSDP shards block by block: fsdp_units yields each entry of the down/mid/up block lists of the outer
    and the inner UNet (no block twice, no resnet or attention list inside them), the bulk of the weights."""
    from mdm_fast.train.distributed import fsdp_units
    from mdm_fast.train.trainer import build_network

    model = build_network(tiny(tmp_path), 10)
    inner = model.inner_unet
    want = [*model.down_blocks, *model.up_blocks, *inner.down_blocks, *inner.mid_blocks, *inner.up_blocks]
    units = list(fsdp_units(model))
    assert len(units) == len(want) == 10 and {id(u) for u in units} == {id(b) for b in want}
    sharded = sum(p.numel() for u in units for p in u.parameters())
    assert sharded > 0.9 * sum(p.numel() for p in model.parameters())


def test_a_micro_step_whose_capture_fails_runs_eagerly_as_without_a_graph(monkeypatch):
    """eager_on_error: a capture that fails after its warm-up runs (which created the gradients and loss
    sums) undoes them, once though the capture and the fall-back both restore, and the step runs eagerly:
    the gradients of the micro-batches' mean loss (grad_weight 1/accumulations by default) and their
    mean loss sums; the update leaves zero gradients, not None, for the next step's graph to accumulate into."""
    from mdm_fast.engine import graphs
    from mdm_fast.train.graphed_step import GraphedMicroSteps

    def failing_capture(runner, args):
        runner.before_warmup()
        for _ in range(runner.warmup):
            runner.fn(*args)
        runner.after_warmup()
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphedCallable, "_capture", failing_capture)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "default_generators", (torch.Generator(),))
    monkeypatch.setattr(graphs, "end_generator_captures", lambda gens: None)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    params = list(model.parameters())
    batches = [torch.randn(2, 3), torch.randn(2, 3)]  # (B, features)
    losses = [model(x).square().mean() for x in batches]
    levels = [model(x).abs().mean().detach() for x in batches]
    want_grads = torch.autograd.grad(sum(losses) / 2, params)
    step = GraphedMicroSteps(params, torch.optim.AdamW(params, fused=True),
                             lambda x: (model(x).square().mean(), {"loss_level0": model(x).abs().mean()}),
                             torch.Generator(), accumulations=2, max_grad_norm=1e9, capture=False, eager_on_error=True)
    step.runner.capture = True
    for i, x in enumerate(batches):
        step.micro_step(x, last=i == 1)
    assert not step.runner.capture
    for p, g in zip(params, want_grads):
        torch.testing.assert_close(p.grad, g)
    stats, ok = step.update()
    torch.testing.assert_close(stats["loss"], sum(losses).detach() / 2)
    torch.testing.assert_close(stats["loss_level0"], sum(levels) / 2)
    assert float(ok) == 1.0 and all(p.grad is not None and not p.grad.any() for p in params)


@pytest.mark.parametrize("acc", [1, 2])
def test_ddp_capture_of_the_all_reduce_comes_after_eleven_all_reducing_forwards(monkeypatch, acc):
    """DDP reads CUDA events on the host in its 2nd to 11th forwards that all-reduce, which a capture
    cannot contain: the capture of the last micro-step is the 12th such forward at least, however many
    no_sync forwards and captures came before (a one-rank GPU run failed this way with accumulation)."""
    from contextlib import contextmanager

    from mdm_fast.train.graphed_step import DDP_TIMED_FORWARDS, GraphedMicroSteps

    class StandInDDP(torch.nn.Module):  # grad_sync sees no_sync; counts the forwards that all-reduce
        def __init__(self, module):
            super().__init__()
            self.module, self.syncing, self.all_reducing_forwards = module, True, 0

        def forward(self, x):
            self.all_reducing_forwards += self.syncing
            return self.module(x)

        @contextmanager
        def no_sync(self):
            self.syncing = False
            try:
                yield
            finally:
                self.syncing = True

    ddp = StandInDDP(torch.nn.Linear(3, 1))
    params = list(ddp.parameters())
    captures = []  # (last, all-reducing forwards before the captured one)

    class Graph:
        def replay(self):
            pass

    def capture(runner, args):
        for _ in range(runner.warmup):
            runner.fn(*args)
        captures.append((args[0], ddp.all_reducing_forwards))
        return Graph(), runner.fn(*args)

    monkeypatch.setattr(GraphedCallable, "_capture", capture)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "default_generators", (torch.Generator(),))
    step = GraphedMicroSteps(params, torch.optim.AdamW(params, fused=True), lambda x: (ddp(x).square().mean(), {}),
                             torch.Generator(), accumulations=acc, max_grad_norm=1.0, capture=False, ddp=ddp)
    step.runner.capture = True
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: t)  # the skip flag, one rank
    for _ in range(3):
        for micro in range(acc):
            step.micro_step(torch.randn(2, 3), last=micro == acc - 1)
        step.update()
    assert [last for last, _ in captures] == ([False, True] if acc == 2 else [True])
    assert dict(captures)[True] == DDP_TIMED_FORWARDS
    assert step.runner.num_graphs == acc and step.eager_calls == 0
