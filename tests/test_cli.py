"""The mdm-fast command line: info, convert (lossless both ways), summary, a tiny demo, sample."""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdm_fast.cli.main import backend_report, main
from mdm_fast.train import Trainer, load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from test_config import CONFIGS  # noqa: E402
from test_train import OUTER, _one_thread, as_torchrun_rank, spawn_on_free_port, tiny  # noqa: E402,F401  (_one_thread: the autouse fixture)


def test_info_lists_versions_and_backends(capsys, monkeypatch):
    """Every op and backend is listed, available or why not; without CUDA and the interpreter, triton is
    unavailable for every op, also where its reason function wants more than one tensor to probe."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"torch {torch.__version__}" in text and "mdm_fast._C:" in text and "devices:" in text
    report = backend_report()
    from mdm_fast.ops import dispatch, registered_ops

    assert set(report["ops"]) == set(registered_ops())
    for name, row in report["ops"].items():
        assert set(row) <= set(dispatch.BACKENDS) and row["ref"] == "available", (name, row)
        assert all(v == "available" or v.startswith("unavailable: ") for v in row.values()), (name, row)
        if not torch.cuda.is_available() and "cuda" in row:
            assert row["cuda"].startswith("unavailable"), (name, row)
        if not torch.cuda.is_available() and "triton" in row:
            assert row["triton"].startswith("unavailable") and "TRITON_INTERPRET" in row["triton"], (name, row)
        assert f"op {name}:" in text and all(f" {b:7s} {v}" in text for b, v in row.items()), name


def _model_state():
    from mdm_fast.reference import build_model

    cfg = tiny("unused")
    return build_model("nested_unet", cfg.unet_dict(10)).state_dict()


def test_convert_public_to_ours_and_back_is_lossless(tmp_path, capsys):
    sd = _model_state()
    public = tmp_path / "vis_model_000005.pth"
    torch.save({"state_dict": sd, "batch_num": 5, "loss": 0.25}, public)
    assert main(["convert", str(public), str(tmp_path / "ours.pt"), "--to", "ours"]) == 0
    ours = load_checkpoint(tmp_path / "ours.pt")
    assert ours["step"] == 5 and ours["batch_num"] == 5 and ours["loss"] == 0.25
    assert main(["convert", str(tmp_path / "ours.pt"), str(tmp_path / "back.pth"), "--to", "public"]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(back["state_dict"]) == list(sd)  # same keys in the same order
    for k, v in sd.items():
        assert back["state_dict"][k].dtype == v.dtype and torch.equal(back["state_dict"][k], v), k
    assert back["batch_num"] == 5
    torch.save({"state_dict": sd, "step": 7}, tmp_path / "step_only.pt")  # ours names the step "step"
    assert main(["convert", str(tmp_path / "step_only.pt"), str(tmp_path / "b.pth"), "--to", "public"]) == 0
    assert torch.load(tmp_path / "b.pth", weights_only=True)["batch_num"] == 7


def test_convert_ours_to_public_and_back_keeps_weights_and_ema(tmp_path, capsys):
    Trainer(tiny(tmp_path / "run", num_training_steps=2), quiet=True).train()
    src = tmp_path / "run" / "ckpt_00000002.pt"
    assert main(["convert", str(src), str(tmp_path / "ema.pth"), "--to", "public", "--ema"]) == 0
    assert main(["convert", str(src), str(tmp_path / "pub.pth"), "--to", "public"]) == 0
    assert main(["convert", str(tmp_path / "pub.pth"), str(tmp_path / "again.pt"), "--to", "ours"]) == 0
    a, ema, again = load_checkpoint(src), torch.load(tmp_path / "ema.pth"), load_checkpoint(tmp_path / "again.pt")
    assert all(torch.equal(again["state_dict"][k], v) for k, v in a["state_dict"].items())
    assert all(torch.equal(ema["state_dict"][k], v) for k, v in a["ema_state_dict"].items())
    assert again["step"] == 2
    # ours -> ours with --config: the EMA and the step kept, the given experiment stored with the weights
    from mdm_fast.config import load_experiment
    from mdm_fast.train.checkpoint import FORMAT

    tiny(tmp_path / "other", lr=1e-4).to_yaml(tmp_path / "other.yaml")
    assert main(["convert", str(src), str(tmp_path / "cfg.pt"), "--to", "ours", "--config",
                 str(tmp_path / "other.yaml")]) == 0
    cfg = load_checkpoint(tmp_path / "cfg.pt")
    assert all(torch.equal(cfg["ema_state_dict"][k], v) for k, v in a["ema_state_dict"].items())
    assert cfg["config"] == load_experiment(str(tmp_path / "other.yaml")).to_yaml() != a["config"]
    assert cfg["step"] == 2 and cfg["model"] == "nested_unet" and cfg["format"] == FORMAT
    assert cfg["ema"] == a["ema"] and cfg["seed"] == a["seed"]  # the EMA's warm-up count and the seed too
    # weights that do not fit the config's model: an error naming the file and a mismatch, nothing written
    tiny(tmp_path / "wide", categorical_conditioning=12).to_yaml(tmp_path / "wide.yaml")  # another text width
    for weights, config, text_dim in (("pub.pth", "wide.yaml", "0"), ("pub.pth", "other.yaml", "12"),
                                      (src, "wide.yaml", "0")):  # src: a file whose text_dim is 10
        assert main(["convert", str(tmp_path / weights), str(tmp_path / "no.pt"), "--to", "ours", "--config",
                     str(tmp_path / config), "--text-dim", text_dim]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / weights}: its weights do not fit the model" in err and "size mismatch" in err
        assert not (tmp_path / "no.pt").exists()
    # a text model of unknown width: the file's (10)
    tiny(tmp_path / "t", categorical_conditioning=0, text_model="my/encoder").to_yaml(tmp_path / "unknown.yaml")
    assert main(["convert", str(src), str(tmp_path / "t.pt"), "--to", "ours", "--config",
                 str(tmp_path / "unknown.yaml")]) == 0


def _public_file_with_args(path, state_dict):
    """A file as the public trainer writes it: the weights, batch_num and its pickled training args (an
    object of a module that is gone when the file is read)."""
    (path.parent / "fake_public_args.py").write_text("class Args:\n    def __init__(self):\n        self.lr = 1e-4\n")
    sys.path.insert(0, str(path.parent))
    try:
        import fake_public_args

        torch.save({"state_dict": state_dict, "batch_num": 3, "args": fake_public_args.Args()}, path)
    finally:
        sys.path.remove(str(path.parent))
        sys.modules.pop("fake_public_args", None)


def test_convert_public_file_with_pickled_args(tmp_path, capsys):
    _public_file_with_args(tmp_path / "pub.pth", {"w": torch.arange(4.0)})
    assert main(["convert", str(tmp_path / "pub.pth"), str(tmp_path / "o.pt"), "--to", "ours"]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "pub.pth"), str(tmp_path / "o.pt"), "--to", "ours", "--trust-pickle"]) == 0
    assert torch.equal(load_checkpoint(tmp_path / "o.pt")["state_dict"]["w"], torch.arange(4.0))


def test_bad_inputs_exit_with_a_message(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    assert main(["convert", str(tmp_path / "bad.pt"), str(tmp_path / "x.pt"), "--to", "ours"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "x.pt"), "--to", "ours"]) == 2
    assert "does not exist" in capsys.readouterr().err
    torch.save({"weights": {"w": torch.ones(2)}}, tmp_path / "nosd.pt")
    assert main(["convert", str(tmp_path / "nosd.pt"), str(tmp_path / "x.pt"), "--to", "ours"]) == 2
    assert "no 'state_dict'" in capsys.readouterr().err
    torch.save({"weights": {"w": torch.ones(2)}, "args": Path("a")}, tmp_path / "nosd_args.pt")  # pickled args
    assert main(["convert", str(tmp_path / "nosd_args.pt"), str(tmp_path / "x.pt"), "--to", "ours",
                 "--trust-pickle"]) == 2
    assert "no 'state_dict'" in capsys.readouterr().err
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "no_ema.pt")
    assert main(["convert", str(tmp_path / "no_ema.pt"), str(tmp_path / "x.pt"), "--to", "public", "--ema"]) == 2
    assert "drop --ema" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
    (tmp_path / "c.yaml").write_text("model: unet\nlearning_rate: 3\n")
    assert main(["summary", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_summary_of_a_public_config(capsys):
    assert main(["summary", "--config", str(CONFIGS / "cc12m_256x256.yaml")]) == 0
    out = capsys.readouterr().out
    assert "nested_unet" in out and "256" in out
    assert main(["summary", "--config", str(CONFIGS / "cc12m_256x256.yaml"), "--image-size", "128", "name=n"]) == 0
    assert "n: nested_unet, 128x128" in capsys.readouterr().out  # the override and the size are used
    assert main(["summary", "--config", str(CONFIGS / "cc12m_256x256.yaml"), "--image-size", "100"]) == 2
    assert "image size 100: this model halves it 4 times" in capsys.readouterr().err  # 100 -> 50 -> 25 -> 13


def test_summary_text_width_comes_from_the_flag_the_classes_the_width_or_the_text_model():
    """--text-dim wins; then categorical_conditioning's class count, text_dim, and the width of the named
    text model (d_model of the public T5 checkpoints); an unknown model asks for --text-dim."""
    from mdm_fast.config import text_width
    from mdm_fast.config import ExperimentConfig

    assert text_width(ExperimentConfig(categorical_conditioning=10, text_dim=64), 32) == 32
    assert text_width(ExperimentConfig(categorical_conditioning=10, text_dim=64), 0) == 10
    assert text_width(ExperimentConfig(text_dim=64), 0) == 64
    for model, width in (("google/flan-t5-xl", 2048), ("google/flan-t5-xxl", 4096), ("MiniLM", 384)):
        assert text_width(ExperimentConfig(text_model=model), 0) == width, model
    with pytest.raises(ValueError, match="--text-dim"):
        text_width(ExperimentConfig(text_model="bert9000"), 0)
    with pytest.raises(ValueError, match=r"--text-dim: expected >= 1 \(0: from the config\), got -5"):
        text_width(ExperimentConfig(text_dim=64), -5)  # it built a model of another width


def test_quick_demo_then_sample(tmp_path, capsys, monkeypatch):
    """The quick demo writes its grid, loss curve and metrics in a minute; sample reads its checkpoint and
    hands each command-line setting (steps, guidance, eta, negative prompt, precision, seed) to the sampler."""
    t0 = time.time()
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    assert time.time() - t0 < 60
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("samples.png", "loss.png", "metrics.jsonl"):
        assert (tmp_path / "demo" / name).stat().st_size > 0, name
    from PIL import Image

    grid = Image.open(tmp_path / "demo" / "samples.png")
    assert grid.height > 10 * 32  # a row per digit
    ckpt = sorted((tmp_path / "demo").glob("ckpt_*.pt"))[-1]
    assert result["steps"] == int(ckpt.stem.split("_")[1])
    import mdm_fast.train.grids as grids

    calls, generate = [], grids.generate  # the keyword arguments of each generate() call
    monkeypatch.setattr(grids, "generate", lambda *a, **k: calls.append(k) or generate(*a, **k))
    assert main(["sample", "--checkpoint", str(ckpt), "--labels", "1", "7", "--num-per-prompt", "2", "--steps", "4",
                 "--guidance", "2", "--eta", "0.5", "--negative-prompt", "0", "--batch", "3",
                 "--out", str(tmp_path / "s")]) == 0
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert "grid.png" in files and "000_00_level0_32px.png" in files and "001_01_level1_8px.png" in files
    # every batch (4 images in batches of 3: 2) samples with the command line's settings
    assert [(k["steps"], k["guidance"], k["ddim_eta"], k["negative_prompt"]) for k in calls] == [(4, 2.0, 0.5, "0")] * 2
    calls.clear()
    # the same label and seed: the raw weights (--no-ema) and a bigger grid change what comes out, and
    # --precision reaches the sampler (bf16 autocast works on a CPU too; its rounding is below 8 bits here);
    # a prompt file's last column is the prompt, --image-size the top resolution
    (tmp_path / "prompts.tsv").write_text("x7\t3\n\n9\n")  # id<TAB>label; a blank line; a label
    runs = {"fp32": ["--precision", "fp32"], "bf16": ["--precision", "bf16"], "raw": ["--no-ema", "--grid-scale", "2"],
            "size": ["--image-size", "48"], "file": ["reader_config.image_size=64", "--prompt-file",
                                                   str(tmp_path / "prompts.tsv")]}  # an override: before the rest
    for name, extra in runs.items():
        labels = [] if name == "file" else ["--labels", "3"]
        assert main(["sample", "--checkpoint", str(ckpt), *extra, *labels, "--num-per-prompt", "1", "--steps", "2",
                     "--out", str(tmp_path / name)]) == 0, name
    img = {n: np.asarray(Image.open(tmp_path / n / "000_00_level0_32px.png")) for n in ("fp32", "bf16", "raw")}
    assert [k["autocast"] for k in calls[:2]] == [None, torch.bfloat16] and not np.array_equal(img["fp32"], img["raw"])
    grid = {n: Image.open(tmp_path / n / "grid.png").size for n in ("fp32", "raw")}
    assert grid["raw"][0] > grid["fp32"][0] and grid["raw"][1] > grid["fp32"][1]  # --grid-scale 2
    assert (tmp_path / "file" / "001_00_level0_64px.png").stat().st_size > 0  # two prompts: 3 and 9
    assert (tmp_path / "size" / "000_00_level0_48px.png").stat().st_size > 0
    # the same label twice: two sets of files; one noise stream per run (seed 0's second image is not
    # seed 1's first, which a seed per batch made it)
    for seed in (0, 1):
        assert main(["sample", "--checkpoint", str(ckpt), "--labels", "5", "5", "--num-per-prompt", "1", "--steps",
                     "2", "--batch", "1", "--seed", str(seed), "--out", str(tmp_path / f"seed{seed}")]) == 0
    first, second = (np.asarray(Image.open(tmp_path / "seed0" / f"00{k}_00_level0_32px.png")) for k in (0, 1))
    assert not np.array_equal(first, second)
    seed1 = np.asarray(Image.open(tmp_path / "seed1" / "000_00_level0_32px.png"))
    assert not np.array_equal(second, seed1) and not np.array_equal(first, seed1)  # --seed is used
    assert main(["sample", "--checkpoint", str(ckpt), "--prompts", "a cat", "--out", str(tmp_path / "s2")]) == 2
    assert main(["sample", "--checkpoint", str(ckpt), "--labels", "1", "--steps", "2", "--cuda-graphs",
                 "--out", str(tmp_path / "s3")]) == 2  # bare --cuda-graphs = on: needs CUDA
    assert "--cuda-graphs on: needs a CUDA device" in capsys.readouterr().err


def test_sample_a_public_file_with_pickled_args(tmp_path, capsys):
    """A public checkpoint and its YAML: refused without --trust-pickle (saying so), then the images of
    the same weights in our format."""
    yaml_path = tmp_path / "tiny.yaml"
    tiny(tmp_path / "unused", num_training_steps=1, save_freq=1).to_yaml(yaml_path)
    assert main(["train", "--config", str(yaml_path), "--output-dir", str(tmp_path / "run")]) == 0
    ours = tmp_path / "run" / "ckpt_00000001.pt"
    _public_file_with_args(tmp_path / "pub.pth", load_checkpoint(ours)["state_dict"])
    common = ["--labels", "3", "--num-per-prompt", "1", "--steps", "2", "--grid-rows", "0"]
    pub = ["sample", "--checkpoint", str(tmp_path / "pub.pth"), "--config", str(yaml_path), *common]
    capsys.readouterr()
    assert main([*pub, "--out", str(tmp_path / "refused")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main([*pub, "--trust-pickle", "--out", str(tmp_path / "pub")]) == 0
    assert main(["sample", "--checkpoint", str(ours), "--no-ema", *common, "--out", str(tmp_path / "ours")]) == 0
    want = _pixels(tmp_path / "ours")
    assert len(want) == 2 and _pixels(tmp_path / "pub").keys() == want.keys()
    assert all(np.array_equal(a, want[k]) for k, a in _pixels(tmp_path / "pub").items())


def _sample_worker(rank, world, port, args, printed):
    import contextlib

    as_torchrun_rank(rank, world, port)
    with open(f"{printed}.{rank}", "w") as f, contextlib.redirect_stdout(f):
        assert main(args) == 0
    assert not torch.distributed.is_initialized()  # main left the process group


def _pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*_level*px.png"))}


def test_sampling_split_over_processes_writes_what_one_process_writes(tmp_path, capsys):
    """torchrun's processes take every other batch of the run (each seeded by (seed, batch)): the same files
    as one process; --skip-existing makes only the batches with a missing file again, the same images; the
    grid shows the first --grid-rows prompts, read back from the files; prompts.tsv indexes the names."""
    yaml_path = tmp_path / "tiny.yaml"
    tiny(tmp_path / "unused", num_training_steps=1, save_freq=1).to_yaml(yaml_path)
    assert main(["train", "--config", str(yaml_path), "--output-dir", str(tmp_path / "run")]) == 0
    ckpt = str(tmp_path / "run" / "ckpt_00000001.pt")
    common = ["sample", "--checkpoint", ckpt, "--labels", "3", "1", "4", "--num-per-prompt", "3", "--batch", "2",
              "--steps", "2", "--seed", "5", "--grid-rows", "2"]
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["images"], result["generated"], result["skipped"]) == (9, 9, 0)
    args = [*common, "--out", str(tmp_path / "two")]
    spawn_on_free_port(_sample_worker, args, str(tmp_path / "printed"))
    assert (tmp_path / "printed.1").read_text() == ""  # rank 0 reports for all: 5 batches, 3 of them its own
    result = json.loads((tmp_path / "printed.0").read_text().strip().splitlines()[-1])
    assert (result["images"], result["generated"], result["skipped"]) == (9, 9, 0)
    one, two = _pixels(tmp_path / "one"), _pixels(tmp_path / "two")
    assert len(one) == 9 * 2 and one.keys() == two.keys()  # 3 labels x 3 copies x 2 levels
    assert all(np.array_equal(one[k], two[k]) for k in one)
    assert len({v.tobytes() for k, v in one.items() if "level0" in k}) == 9  # no two share noise
    assert (tmp_path / "two" / "prompts.tsv").read_text() == "0\t3\n1\t1\n2\t4\n"
    # the grid: 2 rows of 3 copies, each cell every level side by side (the 8 px level enlarged to 16)
    grid = np.asarray(Image.open(tmp_path / "one" / "grid.png"))
    assert grid.shape[0] == 2 * (16 + 4) + 4
    assert np.array_equal(grid, np.asarray(Image.open(tmp_path / "two" / "grid.png")))
    x0 = grid.shape[1] - 3 * (16 * 2 + 2 + 4)  # the first cell of row 0 (after the label column), its top level
    assert np.array_equal(grid[4:20, x0 + 18:x0 + 34], one["000_00_level0_16px.png"])
    # a stopped run: the batch holding the missing file is made again, the others skipped
    (tmp_path / "one" / "002_01_level1_8px.png").unlink()  # the 8th image: batch 3 (images 6 and 7)
    (tmp_path / "one" / "grid.png").unlink()
    assert main([*common, "--grid-rows", "0", "--skip-existing", "--out", str(tmp_path / "one")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["generated"], result["skipped"], "grid" in result) == (2, 7, False)
    again = _pixels(tmp_path / "one")
    assert again.keys() == one.keys() and all(np.array_equal(one[k], again[k]) for k in one)
    assert not (tmp_path / "one" / "grid.png").exists()
    # another run's images are not kept: sample.json tells (or, missing, cannot tell) which run made them
    for changed, field in ((["--steps", "3"], "steps"), (["--labels", "3", "1", "5"], "prompts_sha256"),
                           (["--seed", "6"], "seed"), (["--no-ema"], "no_ema"), (["--guidance", "2"], "guidance"),
                           (["--eta", "0.5"], "eta"), (["log_freq=7"], "overrides"),
                           (["--guidance", "2", "--negative-prompt", "0"], "guidance, negative_prompt")):
        assert main([*common, *changed, "--skip-existing", "--out", str(tmp_path / "one")]) == 2
        assert f"holds the images of another run (its sample.json differs in {field})" in capsys.readouterr().err
    other = load_checkpoint(ckpt)  # other weights written over the same path
    other["ema_state_dict"] = {k: v + 1 for k, v in other["ema_state_dict"].items()}
    torch.save(other, tmp_path / "other.pt")
    (tmp_path / "other.pt").replace(ckpt)
    assert main([*common, "--skip-existing", "--out", str(tmp_path / "one")]) == 2
    assert "sample.json differs in checkpoint_id" in capsys.readouterr().err
    # a run without --skip-existing removes the folder's images first: stopped or not, none of another
    # run's can pass for its own (its sample.json is written before its images)
    assert main([*common, "--labels", "3", "--grid-rows", "0", "--out", str(tmp_path / "one")]) == 0
    assert sorted(_pixels(tmp_path / "one")) == [f"000_{i:02d}_level{d}_{px}px.png" for i in range(3)
                                                 for d, px in ((0, 16), (1, 8))]
    (tmp_path / "one" / "sample.json").unlink()
    assert main([*common, "--skip-existing", "--out", str(tmp_path / "one")]) == 2
    assert "without a sample.json" in capsys.readouterr().err


def test_from_uint8_inverts_to_uint8():
    from mdm_fast.train.grids import from_uint8, to_uint8

    rgb = np.arange(256 * 3, dtype=np.int64).reshape(1, 16, 16, 3).__mod__(256).astype(np.uint8)
    assert np.array_equal(to_uint8(from_uint8(rgb)), rgb)
    grey = rgb[..., 0]  # (B, H, W): one channel
    assert from_uint8(grey).shape == (1, 1, 16, 16) and np.array_equal(to_uint8(from_uint8(grey))[..., 0], grey)
    assert from_uint8(np.array([[[[0, 127, 255]]]], dtype=np.uint8)).flatten().tolist() == [-127 / 128, 0.0, 1.0]


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch: expected >= 1, got 0"),
    (["--grid-rows", "-1"], "--grid-rows: expected >= 0 (0: no grid), got -1"),
    (["--steps", "0"], "--steps: expected >= 1, got 0"),
    (["--num-per-prompt", "-1"], "--num-per-prompt: expected >= 1"),
    (["--grid-scale", "0"], "--grid-scale: expected >= 1"),
    (["--negative-prompt", "blurry"], "only used with --guidance != 1"),
    (["--prompts", "a cat", "diffusion_config.sampler_config.threshold_function=NONE"], "go before --prompts"),
    (["--guidance", "nan"], "--guidance: expected a finite number, got nan"),
    (["--eta", "inf"], "--eta: expected a finite number, got inf"),
    (["--eta", "nan"], "--eta: expected a finite number, got nan"),
])
def test_sample_refuses_bad_arguments_before_loading(tmp_path, capsys, args, message):
    # the checkpoint does not exist: each check runs before anything is loaded
    assert main(["sample", "--checkpoint", str(tmp_path / "none.pt"), "--labels", "1", *args]) == 2
    assert message in capsys.readouterr().err


def test_another_configs_weights_and_file_system_errors_are_named(tmp_path, capsys):
    """Weights of another config (resume, sample), a missing file, an --out that is a file: an error line
    naming the file, not a traceback; convert --to ours refuses --ema, which it would ignore."""
    yaml_path = tmp_path / "tiny.yaml"
    tiny(tmp_path / "unused", num_training_steps=1, save_freq=1).to_yaml(yaml_path)
    run = tmp_path / "run"
    assert main(["train", "--config", str(yaml_path), "--output-dir", str(run)]) == 0
    ckpt, wider = run / "ckpt_00000001.pt", "unet_config.temporal_dim=16"
    capsys.readouterr()
    assert main(["train", "--config", str(yaml_path), "--output-dir", str(run), "num_training_steps=2", wider]) == 2
    assert f"{ckpt}: its weights do not fit the model this config builds (size mismatch" in capsys.readouterr().err
    labels = ["--labels", "1", "--steps", "2", "--out", str(tmp_path / "s")]
    assert main(["sample", "--checkpoint", str(ckpt), "--config", str(yaml_path), wider, *labels]) == 2
    assert "its weights do not fit the model this config builds" in capsys.readouterr().err
    ddp = tmp_path / "ddp.pt"  # weights saved from a DDP-wrapped model: the error says what to strip
    torch.save({"state_dict": {"module." + k: v for k, v in load_checkpoint(ckpt)["state_dict"].items()}}, ddp)
    assert main(["sample", "--checkpoint", str(ddp), "--config", str(yaml_path), *labels]) == 2
    assert "its keys start with 'module.' (saved from a DDP-wrapped model): strip" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(ckpt), "--prompt-file", str(tmp_path / "none.tsv"), *labels]) == 2
    err = capsys.readouterr().err
    assert "No such file or directory" in err and "none.tsv" in err
    (tmp_path / "a_file").write_text("")
    assert main(["sample", "--checkpoint", str(ckpt), "--labels", "1", "--steps", "2", "--out",
                 str(tmp_path / "a_file")]) == 2
    assert "a_file" in capsys.readouterr().err
    assert main(["convert", str(ckpt), str(tmp_path / "x.pt"), "--to", "ours", "--ema"]) == 2
    assert "--ema exports the EMA weights --to public" in capsys.readouterr().err
    # an image size the model cannot halve evenly: refused before any file is written
    assert main(["sample", "--checkpoint", str(ckpt), "--image-size", "10", *labels]) == 2
    assert "image size 10: this model halves it 2 times" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    assert main(["train", "--config", str(yaml_path), "--output-dir", str(tmp_path / "r10"),
                 "reader_config.image_size=10"]) == 2
    assert "must be a positive multiple of 4" in capsys.readouterr().err and not (tmp_path / "r10").exists()


def test_a_sample_run_refused_by_the_model_sampler_or_encoder_leaves_the_folder_as_it_was(tmp_path, capsys):
    """What only the loaded model, its sampler or its encoder can judge is refused before a run without
    --skip-existing removes the folder's images (they were all deleted, then the run failed)."""
    Trainer(tiny(tmp_path / "run", num_training_steps=1, save_freq=1), quiet=True).train()
    common = ["sample", "--checkpoint", str(tmp_path / "run" / "ckpt_00000001.pt"), "--steps", "2", "--out",
              str(tmp_path / "s")]
    assert main([*common, "--labels", "3"]) == 0
    before = _pixels(tmp_path / "s")
    for bad, message in ((["--labels", "3", "--steps", "2000"], "num_inference_steps must be in [1, 1000]"),
                         (["--labels", "10"], "class labels must lie in [0, 10), got [10]"),
                         (["--prompts", "a cat"], "must be class indices"),
                         (["--labels", "3", "--guidance", "2", "--negative-prompt", "blurry"],
                          "negative_prompt must be class indices"),
                         (["--labels", "3", "--eta", "-1"], "ddim_eta must be None (ancestral DDPM) or a finite"),
                         (["--labels", "3", "--cuda-graphs", "on"], "--cuda-graphs on: needs a CUDA device"),
                         (["--labels", "3", "--device", "gpu"], "--device: expected cpu, cuda or cuda:N, got 'gpu'"),
                         (["--labels", "3", "--device", "cuda:7"], "--device cuda:7: no such CUDA device here")):
        capsys.readouterr()
        assert main([*common, *bad]) == 2, bad
        assert message in capsys.readouterr().err, bad
        after = _pixels(tmp_path / "s")
        assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before), bad


def test_prompt_files_public_tables_and_plain_lines(tmp_path):
    """The public prompt files (a 'caption' header), quoted fields spanning lines and a byte-order mark are
    read as the data tables are; a file without that header is one prompt per line, its last column."""
    from mdm_fast.cli.sample import read_prompt_file, run_manifest

    public = tmp_path / "prompts_public.tsv"
    public.write_text('\ufeffcaption\n"a bed\nframe, ""DIY"""\na red car\n\n', encoding="utf-8")
    assert read_prompt_file(public) == ['a bed\nframe, "DIY"', "a red car"]
    csv_file = tmp_path / "captions.csv"
    csv_file.write_text('file,caption\nx.png,"a cat, sitting"\n')
    assert read_prompt_file(csv_file) == ["a cat, sitting"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"caption": "a dog"}\n{"label": 3}\n')
    assert read_prompt_file(jsonl) == ["a dog"]
    plain = tmp_path / "prompts.tsv"
    plain.write_text("\ufeff0\ta corgi\n\n1\tcaptions, plain\n", encoding="utf-8")
    assert read_prompt_file(plain) == ["a corgi", "captions, plain"]
    # two prompts and one that holds a newline: different runs for --skip-existing
    args = argparse.Namespace(seed=0, batch=1, num_per_prompt=1, steps=2, guidance=1.0, negative_prompt=None,
                              eta=None, no_ema=False, overrides=[], checkpoint=str(plain), config=None)
    assert run_manifest(args, ["a", "b"], 8, None) != run_manifest(args, ["a\nb"], 8, None)


def test_sample_refuses_labels_for_a_text_model(tmp_path, capsys, monkeypatch):
    """--labels of a text-conditioned model were read as the captions "1", "2"."""
    import mdm_fast.cli.sample as sample
    from mdm_fast.text import PrecomputedEncoder

    monkeypatch.setattr(sample, "load_for_sampling", lambda *a: (None, PrecomputedEncoder(6), None, None))
    assert main(["sample", "--checkpoint", str(tmp_path / "text.pt"), "--labels", "1", "2"]) == 2
    assert "is conditioned on text (PrecomputedEncoder), not on class labels" in capsys.readouterr().err


def test_demo_refuses_to_delete_another_runs_checkpoints(tmp_path, capsys):
    other = tmp_path / "run"
    other.mkdir()
    (other / "config.yaml").write_text("name: my_big_run\n")
    (other / "ckpt_00100000.pt").write_bytes(b"weights")
    assert main(["demo", "--quick", "--out", str(other)]) == 2
    assert "holds checkpoints of another run" in capsys.readouterr().err
    assert (other / "ckpt_00100000.pt").read_bytes() == b"weights"


def test_a_fresh_demo_deletes_an_earlier_demos_checkpoints_and_resume_keeps_them(tmp_path, monkeypatch):
    """Without --resume the demo starts over (its old checkpoints deleted); with it they stay. --steps
    sets the run's training steps (else 12 for --quick)."""
    import mdm_fast.train

    steps = []  # each run's num_training_steps

    def stop(cfg):
        steps.append(cfg.num_training_steps)
        raise ValueError("stopped before training")

    monkeypatch.setattr(mdm_fast.train, "Trainer", stop)
    (tmp_path / "config.yaml").write_text("name: demo_digits\n")
    (tmp_path / "ckpt_00000005.pt").write_bytes(b"an earlier demo")
    assert main(["demo", "--quick", "--resume", "--steps", "3", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "ckpt_00000005.pt").exists()
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "ckpt_00000005.pt").exists() and steps == [3, 12]


def test_train_from_a_yaml_with_overrides_then_resume(tmp_path, capsys, monkeypatch):
    """train: overrides, --steps, resume, bad values named, --time-limit (minutes) stops the run."""
    yaml_path = tmp_path / "tiny.yaml"
    tiny(tmp_path / "unused", num_training_steps=3, save_freq=1).to_yaml(yaml_path)
    out = tmp_path / "run"
    assert main(["train", "--config", str(yaml_path), "--output-dir", str(out), "--steps", "2", "batch_size=2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    assert main(["train", "--config", str(yaml_path), "--output-dir", str(out), "batch_size=2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 3
    assert "batch_size: 2" in (out / "config.yaml").read_text()
    assert main(["train", "--config", str(yaml_path), "nonsense_field=1"]) == 2
    assert "nonsense_field" in capsys.readouterr().err
    for bad, message in ((["--steps", "-3"], "--steps: expected >= 1"), (["num_training_steps=-5"],
                         "num_training_steps: expected >= 1")):
        assert main(["train", "--config", str(yaml_path), "--output-dir", str(tmp_path / "bad"), *bad]) == 2
        assert message in capsys.readouterr().err
    for bad in (["--steps", "-1"], ["--minutes", "-1"]):
        assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), *bad]) == 2
        assert f"{bad[0]}: expected >= 0 (0: by device)" in capsys.readouterr().err
    # a time limit stops the run after the step that ends past it, with a checkpoint there
    assert main(["train", "--config", str(yaml_path), "--output-dir", str(tmp_path / "timed"), "--time-limit",
                 "1e-6", "num_training_steps=1000", "save_freq=1000"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 1
    assert (tmp_path / "timed" / "ckpt_00000001.pt").is_file()
    assert main(["train", "--config", str(yaml_path), "--time-limit", "0"]) == 2
    assert "--time-limit: expected minutes > 0" in capsys.readouterr().err
    # --time-limit is in minutes: 1.5 gives the trainer a deadline 90 s away (the trainer stubbed)
    import mdm_fast.train

    deadlines = []
    trainer = argparse.Namespace(dist=argparse.Namespace(is_main=False),
                                 train=lambda stop_after, deadline: deadlines.append(deadline) or {"step": 0})
    monkeypatch.setattr(mdm_fast.train, "Trainer", lambda cfg: trainer)
    t0 = time.time()
    assert main(["train", "--config", str(yaml_path), "--time-limit", "1.5"]) == 0
    assert t0 + 90 <= deadlines[0] <= time.time() + 90


@pytest.mark.gpu
def test_gpu_quick_demo_trains_on_graphs_and_samples_on_graphs(tmp_path, caplog):
    """End to end on a GPU: the trainer's graphed step (cuda_graphs: auto) on real data with bf16 autocast,
    then the EMA model sampled with graphed steps; the loss is finite and the grid written."""
    from mdm_fast.cli.demo import run_demo

    with caplog.at_level("WARNING"):
        result = run_demo(tmp_path / "demo", steps=6, quick=True)
    for trouble in ("ran eagerly", "updates skipped", "capture failed"):
        assert trouble not in caplog.text
    lines = [json.loads(x) for x in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert result["steps"] == len(lines) >= 1 and all(torch.isfinite(torch.tensor(r["loss"])) for r in lines)
    assert (tmp_path / "demo" / "samples.png").stat().st_size > 0
