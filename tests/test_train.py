"""Multi-view training: config, data sharding, checkpoints, resume after SIGKILL, DDP, load()."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import upfeat
from upfeat.checkpoint import CheckpointError, read_meta, save_checkpoint
from upfeat.train import MultiViewObjective, TrainConfig

from upfeat.train.log import CsvLog
from upfeat.train.state import optimizer_from_tensors, optimizer_to_tensors

TINY = ["--backbone", "vits14_focus", "--image-size", "56", "--batch-size", "1", "--views", "2",
        "--upsampler-args", '{"range_dim": 8}', "--seed", "3", "--no-progress"]


@pytest.fixture
def image_dir(data_dir, tmp_path):
    """6 DAVIS frames from two sequences, plus a file that is not an image."""
    root = tmp_path / "imgs"
    for seq in ("blackswan", "camel"):
        (root / seq).mkdir(parents=True)
        for f in sorted((data_dir / "davis" / "images" / seq).glob("*.jpg"))[:3]:
            shutil.copy(f, root / seq / f.name)
    (root / "notes.txt").write_text("not an image")
    return root


def run_cli(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "upfeat", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def test_config_schedule_and_validation():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=0.1)
    assert cfg.lr_at(0) == pytest.approx(1e-4)
    assert cfg.lr_at(9) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(9 / 99 * torch.pi)).item())))
    assert cfg.lr_at(99) == pytest.approx(1e-4)
    assert TrainConfig(schedule="constant", warmup=0).lr_at(500) == 1e-3
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="unknown fields"):
        TrainConfig.from_dict({"stepz": 3})
    a, b = TrainConfig(), TrainConfig(backbone="dino_vits8", steps=5)
    assert a.model_differences(b) == ["backbone: 'vits14_focus' -> 'dino_vits8'"]


def test_batches_are_deterministic_sharded_and_streamed(image_dir, tmp_path):
    from upfeat.train.data import TrainBatches, batch_loader, list_files
    (image_dir / "broken.jpg").write_bytes((image_dir / "camel" / "00000.jpg").read_bytes()[:500])
    cache = tmp_path / "files.json"
    with pytest.warns(UserWarning, match="notes.txt"):
        files = list_files([image_dir], cache)
    assert len(files) == 7 and sum(f.endswith("broken.jpg") for f in files) == 1
    # the list is cached: a file added later is not seen by a run resumed with the same --data
    shutil.copy(image_dir / "camel" / "00000.jpg", image_dir / "zzz.jpg")
    assert list_files([image_dir], cache) == files
    with pytest.warns(UserWarning, match="notes.txt"):  # other --data: listed again
        assert len(list_files([image_dir, image_dir / "zzz.jpg"], cache, write=False)) == 8
    with pytest.warns(UserWarning, match="notes.txt"):  # a fresh run never trusts a left-over list
        assert len(list_files([image_dir], cache, reuse=False)) == 8

    data = TrainBatches(files, 64, batch_size=2, seed=1, crops=56)
    # the broken file is replaced by the next readable one, with a warning naming it
    with pytest.warns(UserWarning, match=r"unreadable image: .*broken\.jpg"):
        seen = [data[s] for s in range(10)]
    a = seen[5]
    assert a.shape == (2, 3, 56, 56) and a.dtype == torch.uint8
    assert torch.equal(a, data[5]) and not torch.equal(a, seen[6])
    # DataLoader workers give exactly the same batches, in step order, from any start step
    assert all(torch.equal(x, y) for x, y in zip(batch_loader(data, range(3, 10), workers=2),
                                                 seen[3:]))
    # two ranks at one step see different images (a global batch is split, not duplicated)
    ranks = [TrainBatches(files, 64, batch_size=3, seed=1, crops=64, rank=r, world_size=2)
             for r in (0, 1)]
    assert len({*ranks[0].indices(0), *ranks[1].indices(0)}) == 6
    with pytest.raises(ValueError, match="no readable images"), pytest.warns(UserWarning):
        TrainBatches([image_dir / "broken.jpg"], 64, 1, 0, 56)[0]


def test_optimizer_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.NAdam(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    tensors, meta = optimizer_to_tensors(opt)
    save_checkpoint(tmp_path / "s.safetensors", tensors, {"optimizer": meta})
    loaded, meta2 = load_file(str(tmp_path / "s.safetensors")), read_meta(tmp_path / "s.safetensors")
    opt2 = torch.optim.NAdam(torch.nn.Linear(4, 3).parameters(), lr=5.0)
    optimizer_from_tensors(opt2, loaded, meta2["optimizer"], "s")
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd2["param_groups"][0]["lr"] == 1e-2
    for pid in sd1["state"]:
        for k, v in sd1["state"][pid].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sd2["state"][pid][k])), k
    with pytest.raises(CheckpointError, match="optimiser state does not fit"):
        optimizer_from_tensors(torch.optim.NAdam(torch.nn.Linear(4, 5).parameters()), loaded,
                               meta2["optimizer"], "s")


def test_csv_log_resume_drops_steps_after_checkpoint(tmp_path):
    log = CsvLog(tmp_path / "m.csv")
    for s in range(1, 8):
        log.append({"step": s, "loss": 1.0 / s})
    CsvLog(tmp_path / "m.csv", resume_step=4).append({"step": 5, "loss": 9.0})
    rows = CsvLog.read(tmp_path / "m.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["loss"] == 9.0


def test_objective_gradients_reach_every_trainable_parameter():
    cfg = TrainConfig(upsampler_kwargs={"range_dim": 8})
    obj = MultiViewObjective.from_config(cfg, dim=16, stride=14)
    from upfeat.jitter import apply_view, sample_views
    img = torch.rand(2, 3, 56, 42)
    f = lambda x: torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True).expand(-1, 16, -1, -1) * torch.linspace(0, 1, 16).view(1, 16, 1, 1), 14, ceil_mode=True)  # noqa: E731
    views = sample_views(3, torch.Generator().manual_seed(0), (56, 42))
    xs = [apply_view(img, v) for v in views]
    out = obj(img, f(img), views, xs, [f(x) for x in xs], torch.Generator().manual_seed(1))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    missing = [n for n, p in obj.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if not k.startswith(("optim.", "rng."))}


def test_train_cli_writes_run_and_load_roundtrip(image_dir, tmp_path):
    out = tmp_path / "run"
    r = run_cli(["--data", str(image_dir), "--out", str(out), "--steps", "3", "--ckpt-every", "2",
                 *TINY], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "notes.txt" in r.stderr  # the non-image was skipped with a warning
    for f in ("model.safetensors", "model.json", "metrics.csv", "loss.png", "config.json",
              "checkpoints/last.safetensors"):
        assert (out / f).is_file(), f
    assert [row["step"] for row in CsvLog.read(out / "metrics.csv")] == [1, 2, 3]
    meta = read_meta(out / "model.safetensors")
    assert meta["backbone"] == {"name": "vits14_focus", "kwargs": {}, "dim": 384, "stride": 14}
    assert meta["train"]["step"] == 3 and meta["upsampler"]["range_dim"] == 8

    model = upfeat.load(out)
    assert isinstance(model, upfeat.UpFeat) and not model.training
    img = torch.rand(1, 3, 50, 70)
    with torch.no_grad():
        hr = model(img)
    assert hr.shape == (1, 384, 50, 70) and torch.isfinite(hr).all()
    # The weights are the trained ones (not a fresh init).
    saved = tensors_of(out / "model.safetensors")
    for k, v in model.upsampler.state_dict().items():
        assert torch.equal(v, saved[f"upsampler.{k}"])

    # Another backbone (stride 8) is refused with a clear error; the same for resuming.
    other = upfeat.backbones.create("dino_vits8", pretrained=False)
    with pytest.raises(CheckpointError, match=r"trained for backbone 'vits14_focus' \(dim 384, stride 14\).*stride 8"):
        upfeat.load(out, backbone=other)
    r = run_cli(["--out", str(out), "--resume", "--backbone", "dino_vits8", "--steps", "5",
                 "--no-progress"], cwd=tmp_path)
    assert r.returncode == 2 and "backbone: 'vits14_focus' -> 'dino_vits8'" in r.stderr
    # Without --resume an existing run is never overwritten.
    r = run_cli(["--data", str(image_dir), "--out", str(out), *TINY], cwd=tmp_path)
    assert r.returncode == 2 and "--resume" in r.stderr
    assert torch.equal(tensors_of(out / "model.safetensors")["upsampler.residual.1.weight"],
                       saved["upsampler.residual.1.weight"])


def test_resume_after_sigkill_matches_uninterrupted_run(image_dir, tmp_path):
    """The reference decodes in the training process (--workers 0), the killed run in 2 DataLoader
    workers (killed with them), the resumed one in-process again: data never depends on workers."""
    steps, args = 30, ["--data", str(image_dir), "--ckpt-every", "4", *TINY]
    ref = tmp_path / "ref"
    r = run_cli([*args, "--out", str(ref), "--steps", str(steps), "--workers", "0"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "upfeat", "train", *args, "--out", str(run),
                             "--steps", str(steps), "--workers", "2"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoints" / "last.safetensors"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"
    killed_at = read_meta(ckpt)["train"]["step"]
    assert 0 < killed_at < steps and not (run / "model.safetensors").exists()

    r = run_cli(["--out", str(run), "--resume", "--no-progress", "--workers", "0"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = tensors_of(ref / "model.safetensors"), tensors_of(run / "model.safetensors")
    assert a.keys() == b.keys()
    # Tolerance: exact. Every random choice is a function of (seed, step, rank) and the optimiser
    # state is restored bit for bit, so the resumed run repeats the same float operations.
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff == 0.0, f"resumed run differs from the uninterrupted one by {diff}"
    assert [row["step"] for row in CsvLog.read(run / "metrics.csv")] == list(range(1, steps + 1))


def test_ddp_two_processes_gloo(image_dir, tmp_path):
    out = tmp_path / "ddp"
    r = run_cli(["--data", str(image_dir), "--out", str(out), "--steps", "3", "--accelerator",
                 "cpu", "--devices", "2", "--strategy", "ddp", *TINY], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = read_meta(out / "model.safetensors")
    assert meta["train"]["world_size"] == 2 and meta["train"]["step"] == 3
    assert [row["step"] for row in CsvLog.read(out / "metrics.csv")] == [1, 2, 3]
    upfeat.load(out)


@pytest.mark.parametrize("downsampler", ["attention", "simple"])
def test_objective_fast_path_equals_plain_loss(downsampler):
    """Projecting before warping (+ warped guidance) == warping full features, same projection."""
    from upfeat.jitter import apply_view, sample_views
    from upfeat.losses.projection import random_projection
    torch.manual_seed(0)
    cfg = TrainConfig(downsampler=downsampler, upsampler_kwargs={"range_dim": 8}, proj_dim=5,
                      crf_weight=0.01)
    obj = MultiViewObjective.from_config(cfg, dim=12, stride=8).double().eval()
    img = torch.rand(2, 3, 40, 48, dtype=torch.float64)
    lr = torch.randn(2, 12, 5, 6, dtype=torch.float64)
    views = sample_views(3, torch.Generator().manual_seed(0), (40, 48))
    xs = [apply_view(img, v) for v in views]
    fs = [torch.randn(2, 12, 5, 6, dtype=torch.float64) for _ in views]
    fast = obj(img, lr, views, xs, fs, torch.Generator().manual_seed(7))

    gen = torch.Generator().manual_seed(7)
    proj = random_projection(12, 5, gen, dtype=torch.float64)
    hr = obj.upsampler(lr, img)
    plain = [obj.criterion(f, apply_view(hr, v), obj.downsampler, gen, image=x, projection=proj)
             for v, x, f in zip(views, xs, fs)]
    for k in ("loss", "nll", "crf"):
        ref = sum(p[k] for p in plain) / len(plain)
        assert torch.allclose(fast[k], ref, rtol=1e-10, atol=1e-10), (k, fast[k], ref)


def test_atomic_write_gives_normal_file_permissions(tmp_path):
    """Outputs get the mode open() would give (0666 & ~umask), not mkstemp's private 0600."""
    import os
    import stat

    from upfeat.checkpoint import atomic_write
    old = os.umask(0o022)
    try:
        p = atomic_write(tmp_path / "x.bin", lambda t: t.write_bytes(b"1"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644 and p.read_bytes() == b"1"


def test_one_agnostic_jbu_trains_on_two_backbones(image_dir, tmp_path):
    """Multi-view training of one backbone-agnostic JBU (jbu_stack, residual=False) on two
    backbones of different stride and dim, in turn, each with its own downsampler and loss; the
    run loads for a third backbone (any dim/stride) and resumes from its checkpoint."""
    out = tmp_path / "any"
    args = ["--data", str(image_dir), "--out", str(out), "--views", "2",
            "--backbone", "timm:resnet18,timm:vit_tiny_patch16_224", "--backbone-args",
            '{"pretrained": false}', "--image-size", "64", "--batch-size", "1",
            "--upsampler-args", '{"residual": false, "steps": 5, "range_dim": 4}', "--seed", "1",
            "--no-progress"]
    r = run_cli([*args, "--steps", "2", "--ckpt-every", "1"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = CsvLog.read(out / "metrics.csv")
    assert [row["step"] for row in rows] == [1, 2] and all(row["nll"] != 0 for row in rows)
    meta = read_meta(out / "model.safetensors")
    assert meta["upsampler"]["residual"] is False
    assert meta["backbones"] == ["timm:resnet18", "timm:vit_tiny_patch16_224"]
    saved = tensors_of(out / "model.safetensors")
    shared = upfeat.upsamplers.create("jbu_stack", 1, 32, residual=False, steps=5,
                                                range_dim=4).state_dict()
    assert {k for k in saved if k.startswith("upsampler.")} == {f"upsampler.{k}" for k in shared}
    # one downsampler and loss per backbone, of that backbone's dim (512 and 192)
    assert {k.split(".")[1] for k in saved if not k.startswith("upsampler.")} == {"0", "1"}
    other = upfeat.backbones.wrap(torch.nn.Conv2d(3, 5, 8, stride=8), stride=8, dim=5)
    model = upfeat.load(out, backbone=other)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 40, 50)).shape == (1, 5, 40, 50)
    assert upfeat.model.load_downsampler(out).dim == 512
    # resumed to 3 steps: continues from step 2
    r = run_cli([*args, "--steps", "3", "--resume"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [row["step"] for row in CsvLog.read(out / "metrics.csv")] == [1, 2, 3]
    r = run_cli([*args[:-1], "--upsampler-args", "{}", "--out", str(tmp_path / "x"), "--steps", "1"],
                cwd=tmp_path)
    assert r.returncode != 0 and "backbone-agnostic upsampler" in r.stderr


@pytest.mark.slow  # three training processes: ~40 s on a quiet 2-core machine
def test_two_nodes_equal_one_node_with_two_processes(image_dir, tmp_path):
    """Multi-node as Lightning Fabric runs it (MASTER_ADDR/MASTER_PORT/NODE_RANK, one command per
    node): 2 "nodes" x 1 process on localhost give the weights of 1 node x 2 processes."""
    import socket
    args = ["--data", str(image_dir), "--steps", "5", "--accelerator", "cpu", "--strategy", "ddp",
            "--workers", "1", *TINY]
    one = tmp_path / "one"
    r = run_cli([*args, "--out", str(one), "--devices", "2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "upfeat", "train", *args, "--out", str(two), "--devices", "1",
         "--num-nodes", "2"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "NODE_RANK": str(node)}) for node in (0, 1)]
    errs = [p.communicate(timeout=600)[1] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    assert read_meta(two / "model.safetensors")["train"]["world_size"] == 2
    a, b = tensors_of(one / "model.safetensors"), tensors_of(two / "model.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff == 0.0, f"2 nodes x 1 process differ from 1 node x 2 processes by {diff}"


def test_train_options_are_generated_from_the_config(tmp_path, monkeypatch):
    """Every TrainConfig field is an `upfeat train` option (name, type, help from the field);
    options not given keep the config's defaults; JSON options are parsed, bad JSON is exit 2."""
    import dataclasses

    from typer.main import get_command
    from typer.testing import CliRunner

    import upfeat.train
    from upfeat.apps.cli import app
    seen = []
    monkeypatch.setattr(upfeat.train, "fit", lambda cfg: seen.append(cfg) or tmp_path / "m")
    r = CliRunner().invoke(app, ["train", "--data", "a", "--data", "b", "--out", str(tmp_path / "r"),
                                 "--warmup", "7", "--grad-clip", "0.5", "--no-uncertainty",
                                 "--downsampler-args", '{"kernel_size": 5}', "--devices", "2",
                                 "--workers", "0", "--objective", "scale"])
    assert r.exit_code == 0, r.output
    cfg = seen[0]
    assert (cfg.data, cfg.warmup, cfg.grad_clip, cfg.uncertainty, cfg.downsampler_kwargs,
            cfg.devices, cfg.workers) == (["a", "b"], 7, 0.5, False, {"kernel_size": 5}, 2, 0)
    assert cfg.upsampler == "jbu_cells"  # the scale objective's upsampler unless one is given
    default = TrainConfig()
    assert (cfg.steps, cfg.lr, cfg.progress, cfg.resume) == (default.steps, default.lr, True, False)
    helps = {o: p.help for p in get_command(app).commands["train"].params for o in p.opts}
    for f in dataclasses.fields(TrainConfig):
        name = f.metadata.get("cli", "--" + f.name.replace("_", "-"))
        assert helps.get(name) == f.metadata["help"], f.name
    r = CliRunner().invoke(app, ["train", "--data", "a", "--upsampler-args", "[1]"])
    assert r.exit_code == 2 and "--upsampler-args must be a JSON object" in r.output
    r = CliRunner().invoke(app, ["train", "--data", "a", "--out", str(tmp_path / "r"),
                                 "--workers", "-1"])
    assert r.exit_code == 2 and "workers must be an int >= 0" in r.stderr


def test_view_targets_equal_one_call_per_view_and_bf16_is_close(real_image):
    """The image and its views go through the frozen backbone in one batch: same features as
    one call per view (float32, up to matmul blocking); under bfloat16 within ~1 %."""
    from upfeat.jitter import apply_view, sample_views
    from upfeat.train.objective import view_targets
    torch.manual_seed(0)
    net = upfeat.backbones.create("timm:vit_tiny_patch16_224", pretrained=False).eval()
    img = torch.cat([real_image(64, 80), real_image(64, 80, "davis/images/cows/00000.jpg")])
    views = sample_views(3, torch.Generator().manual_seed(0), (64, 80))
    xs, lr, fs = view_targets(net, img, views)
    with torch.no_grad():
        want = [net(img)] + [net(apply_view(img, v)) for v in views]
    assert len(xs) == len(fs) == 3 and all(torch.equal(x, apply_view(img, v)) for x, v in zip(xs, views))
    for got, ref in zip([lr, *fs], want, strict=True):
        assert got.shape == ref.shape == (2, net.dim, 4, 5) and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    _, lr16, fs16 = view_targets(net, img, views, bf16=True)
    for got, ref in zip([lr16, *fs16], want):
        rel = ((got - ref).norm() / ref.norm()).item()
        assert got.dtype == torch.float32 and 1e-5 < rel < 0.02, rel


def test_backbone_precision_is_validated():
    with pytest.raises(ValueError, match="backbone_precision must be one of"):
        TrainConfig(backbone_precision="fp8")
