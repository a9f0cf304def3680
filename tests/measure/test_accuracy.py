"""The accuracy benchmark: same data for every row, the recipe's schedule, and one pipeline step vs the plain one."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from gpipe_bench import config, models, optim
from gpipe_bench.cli import main
from gpipe_bench.jobs import Job
from gpipe_bench.measure import accuracy
from gpipe_bench.pipe import GPipe
from helpers import accuracy_record

TABLE = config.load("resnet101-accuracy")
QUICK = TABLE.profile("quick")


def _job(name: str, **changes: object) -> Job:
    row = replace(TABLE.row(name, "quick"), **changes)
    return Job(TABLE, row, QUICK.settings, "quick", ["cpu"] * row.devices, seeds=[0], timeout_s=3600)


def _data(n: int = 64) -> accuracy.Dataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return accuracy.Dataset(x, y, x[:16], y[:16])


def test_every_row_sees_the_same_mini_batches_and_replicas_split_them() -> None:
    data = _data()
    a = list(accuracy.batches(data, 32, seed=3, epoch=1))
    b = list(accuracy.batches(data, 32, seed=3, epoch=1))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    other = list(accuracy.batches(data, 32, seed=4, epoch=1))
    assert not torch.equal(a[0][0], other[0][0])
    assert len(a) == 2 and a[0][0].shape == (32, 3, 28, 28)


def test_learning_rate_warms_up_per_iteration_then_steps_down() -> None:
    job = _job("pipeline-256")  # lr 0.1 x B / 128, warm-up 0.2 epochs, x0.1 at 0.6 and 0.85 epochs
    steps = 100  # warm-up: 20 iterations; decays at iterations 60 and 85
    assert accuracy.lr_at(job, 32, 0, steps) == pytest.approx(0.025 / 20)
    assert accuracy.lr_at(job, 32, 19, steps) == pytest.approx(0.025)
    assert accuracy.lr_at(job, 32, 59, steps) == pytest.approx(0.025)
    assert accuracy.lr_at(job, 32, 60, steps) == pytest.approx(0.0025)
    assert accuracy.lr_at(job, 32, 85, steps) == pytest.approx(0.00025)
    assert accuracy.lr_at(job, 512, 30, steps) == pytest.approx(0.4)  # scaled with the batch
    published = replace(job, settings=TABLE.profile("published").settings)  # 4 of 90 epochs, x0.1 at 30/60/80
    assert accuracy.lr_at(published, 256, 4 * steps - 1, steps) == pytest.approx(0.1)
    assert accuracy.lr_at(published, 256, 30 * steps - 1, steps) == pytest.approx(0.1)
    assert accuracy.lr_at(published, 256, 30 * steps, steps) == pytest.approx(0.01)
    assert accuracy.lr_at(published, 256, 80 * steps, steps) == pytest.approx(0.0001)


def test_grey_images_are_kept_in_one_channel_and_batches_widen_them() -> None:
    """The full Fashion-MNIST set is held once in one channel; the crop may be left out, the flips stay the same."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    data = accuracy.Dataset(x, y, x[:16], y[:16])
    cropped = list(accuracy.batches(data, 32, seed=3, epoch=0))
    whole = list(accuracy.batches(data, 32, seed=3, epoch=0, crop=False))
    assert cropped[0][0].shape == whole[0][0].shape == (32, 3, 28, 28)
    assert torch.equal(cropped[0][1], whole[0][1])  # same order
    for image, _ in cropped + whole:
        assert torch.equal(image[:, 0], image[:, 2])  # grey in every channel
    index = torch.randperm(64, generator=torch.Generator().manual_seed(3 * 100_003))[:32]
    flipped = [torch.equal(whole[0][0][k, 0], x[i, 0].flip(-1)) for k, i in enumerate(index.tolist())]
    kept = [torch.equal(whole[0][0][k, 0], x[i, 0]) for k, i in enumerate(index.tolist())]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    assert not torch.equal(cropped[0][0], whole[0][0])


def _states(deferred: bool) -> Dict[str, Dict[str, torch.Tensor]]:
    """Model states after one step of the quick pipeline-256 row's recipe (float64) on the same mini-batch:
    the pipeline, the plain model accumulating gradients over the same 4 micro-batches, and the plain
    model on the whole mini-batch at once."""
    torch.manual_seed(0)
    plain = models.build("resnet14").double()
    accumulate, whole = copy.deepcopy(plain), copy.deepcopy(plain)
    pipe = GPipe(
        copy.deepcopy(plain),
        [19, 32],
        devices=["cpu:0", "cpu:1"],
        chunks=4,
        checkpoint="except_last",
        deferred_batch_norm=deferred,
    )
    job = _job("pipeline-256")
    x = torch.randn(16, 3, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (16,))

    def step(model: torch.nn.Module, losses: Callable[[], List[torch.Tensor]]) -> None:
        optimizer = optim.build(job.settings.optimizer, model.parameters())
        for group in optimizer.param_groups:
            group["lr"] = 0.1
        optimizer.zero_grad()
        for loss in losses():
            loss.backward()
        optimizer.step()

    step(pipe, lambda: [F.cross_entropy(pipe(x), y)])
    step(whole, lambda: [F.cross_entropy(whole(x), y)])
    step(accumulate, lambda: [F.cross_entropy(accumulate(xi), yi) / 4 for xi, yi in zip(x.chunk(4), y.chunk(4))])
    return {
        "pipe": {key.split(".", 2)[2]: v for key, v in pipe.state_dict().items()},  # "partitions.k." stripped
        "accumulate": accumulate.state_dict(),
        "whole": whole.state_dict(),
        "before": plain.state_dict(),
    }


def _diff(states: Dict[str, Dict[str, torch.Tensor]], a: str, b: str, which: str) -> float:
    keys = [
        k for k, v in states["before"].items() if v.is_floating_point() and (("running" in k) == (which == "stats"))
    ]
    return max(float((states[a][k] - states[b][k]).abs().max()) for k in keys)


def test_one_pipeline_step_equals_the_plain_step_with_deferred_batch_norm() -> None:
    """Deferred BN: the parameters equal the plain model's with gradient accumulation over the same
    micro-batches, and every BatchNorm commits its statistics once per mini-batch, as the plain model on
    the whole mini-batch does (the first one, which sees the raw input, to the same values)."""
    states = _states(deferred=True)
    assert _diff(states, "pipe", "accumulate", "params") < 1e-10
    assert int(states["pipe"]["bn1.num_batches_tracked"]) == int(states["whole"]["bn1.num_batches_tracked"]) == 1
    for stat in ("bn1.running_mean", "bn1.running_var"):
        assert float((states["pipe"][stat] - states["whole"][stat]).abs().max()) < 1e-10


def test_without_deferred_batch_norm_the_statistics_differ_a_little() -> None:
    """As published (no deferred BN): the parameters still equal the gradient-accumulation step, and the
        running statistics are those of the accumulation too: updated once per micro-batch of 4 (momentum
        applied 4 times, micro-batch variances) rather than once per mini-batch. Against the plain model on
        the whole mini-batch at once the parameters differ as well (each micro-batch is normalised by its own
        statistics); with micro-batches of 4 in this step the largest parameter difference is of the order of
    the step itself (0.56 against a largest update of 0.30). These are the differences the accuracy table shows do not
        change what the model learns."""
    states = _states(deferred=False)
    assert _diff(states, "pipe", "accumulate", "params") < 1e-10
    assert _diff(states, "pipe", "accumulate", "stats") < 1e-10
    assert int(states["pipe"]["bn1.num_batches_tracked"]) == 4
    assert _diff(states, "pipe", "whole", "stats") > 1e-8
    assert _diff(states, "pipe", "whole", "params") > 1e-8


def test_missing_dataset_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["accuracy", "resnet101", "--data", str(tmp_path / "none"), "--output", str(tmp_path)]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "dataset-fashion-mnist" in errors[0] and "--data" in errors[0]
    assert not list(tmp_path.rglob("*.json"))


def test_a_data_parallel_and_a_pipeline_row_train_end_to_end() -> None:
    data = _data(64)
    settings = replace(QUICK.settings, epochs=1, dataset_size=64)
    for name, devices in (("dataparallel-256", ["cpu", "cpu"]), ("pipeline-256", ["cpu:0", "cpu:1"])):
        row = replace(TABLE.row(name, "quick"), batch=16)
        job = Job(TABLE, row, settings, "quick", devices, seeds=[0], timeout_s=300)
        reports: List[accuracy.Report] = []
        errors = accuracy.train(job, data, seed=0, progress=reports.append).errors
        assert len(errors) == 1 and 0.0 <= errors[0] <= 100.0
        # A report after each quarter of the epoch's 4 steps (from replica 0 across processes), the last with the error.
        assert [(r.epoch, r.step, r.steps) for r in reports] == [(1, 1, 4), (1, 2, 4), (1, 3, 4), (1, 4, 4)], name
        assert [r.error for r in reports[:-1]] == [None] * 3 and reports[-1].error == errors[0]
        assert all(0.0 < r.loss < 100.0 for r in reports) and reports[-1].seconds >= reports[0].seconds


def _pipeline_row(batch: int = 4) -> Job:
    settings = replace(QUICK.settings, epochs=1, dataset_size=32)
    row = replace(TABLE.row("pipeline-256", "quick"), batch=batch, chunks=2)
    return Job(TABLE, row, settings, "quick", ["cpu:0", "cpu:1"], seeds=[0], timeout_s=300)


def test_reported_losses_are_the_means_of_the_step_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each report's loss is the mean of the per-step losses since the previous one, to the last bit."""
    losses: List[torch.Tensor] = []
    cross_entropy = F.cross_entropy

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = cross_entropy(*args, **kwargs)
        losses.append(loss.detach().clone())
        return loss

    monkeypatch.setattr(F, "cross_entropy", spy)
    reports: List[accuracy.Report] = []
    accuracy.train(_pipeline_row(), _data(32), seed=0, progress=reports.append)
    values = [float(loss) for loss in losses]
    assert len(values) == 8 and [r.step for r in reports] == [2, 4, 6, 8]
    expected = []
    for start in range(0, 8, 2):  # a report after every 2 of the 8 steps
        running = 0.0
        for value in values[start : start + 2]:
            running += value
        expected.append(running / 2)
    assert [r.loss for r in reports] == expected


def test_the_loss_is_read_on_the_host_only_when_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """No step waits for its loss: tensors are read as numbers a few times an epoch, not once a step."""
    reads = {"n": 0}
    to_float, item = torch.Tensor.__float__, torch.Tensor.item

    def counted_float(self: torch.Tensor) -> float:
        reads["n"] += 1
        return to_float(self)

    def counted_item(self: torch.Tensor) -> Any:
        reads["n"] += 1
        return item(self)

    monkeypatch.setattr(torch.Tensor, "__float__", counted_float)
    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    reports: List[accuracy.Report] = []
    accuracy.train(_pipeline_row(batch=2), _data(32), seed=0, progress=reports.append)  # 16 steps
    assert len(reports) == accuracy.REPORTS_PER_EPOCH
    # One read per report, and one for the batches' padding value: not one per step.
    assert reads["n"] <= accuracy.REPORTS_PER_EPOCH + 1 < 16


def test_a_loss_that_is_not_finite_names_its_steps() -> None:
    running = accuracy.RunningLoss("pipeline-256 seed 0, epoch 1")
    assert running.mean(0) == 0.0
    running.add(torch.tensor(1.0, requires_grad=True) * 2)
    running.add(torch.tensor(3.0))
    assert running.mean(2) == 2.5  # the sum starts again after each read
    running.add(torch.tensor(float("nan")))
    running.add(torch.tensor(1.0))
    with pytest.raises(FloatingPointError, match=r"pipeline-256 seed 0, epoch 1: loss is nan in steps 3-4"):
        running.mean(4)


@pytest.mark.cuda
def test_the_running_loss_stays_on_the_gpu_until_read() -> None:
    running = accuracy.RunningLoss("pipeline-256 seed 0, epoch 1")
    for value in (0.5, 1.25):
        running.add(torch.tensor(value, device="cuda"))
    assert running.total is not None and running.total.device.type == "cuda"
    assert running.mean(2) == 0.875


def test_published_profile_needs_imagenet_folders(tmp_path: Path) -> None:
    for args, needle in (
        (["--profile", "published"], "--data"),
        (["--profile", "published", "--data", str(tmp_path)], "no train/ directory"),
    ):
        result = CliRunner().invoke(main, ["accuracy", "resnet101", *args, "--output", str(tmp_path / "out")])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert len(errors) == 1 and needle in errors[0], result.output


def test_imagenet_folders_train_end_to_end(tmp_path: Path) -> None:
    """The published recipe's data path on a tiny ImageFolder tree (2 classes, 40×40 PNGs)."""
    from PIL import Image

    from gpipe_bench.data import imagenet

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 4)):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            for k in range(n):
                pixels = torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / split / label / f"{k}.png")
    imagenet.check_layout(tmp_path)
    published = TABLE.profile("published")
    settings = replace(
        published.settings,
        input_size=32,
        epochs=1,
        classes=2,
        extra={**published.settings.extra, "val_resize": 36, "warmup_epochs": 0},
    )
    row = replace(TABLE.row("pipeline-256"), batch=8, chunks=2, balance=(19, 32))
    quick = replace(TABLE, profiles={**TABLE.profiles, "published": replace(published, model="resnet14")})
    job = Job(quick, row, settings, "published", ["cpu", "cpu"], seeds=[0], data=tmp_path, timeout_s=3600)
    data = accuracy.load_dataset(job)
    assert isinstance(data, accuracy.Folders)
    errors = accuracy.train(job, replace(data, workers=0), seed=0).errors
    assert len(errors) == 1 and 0.0 <= errors[0] <= 100.0
    (tmp_path / "val" / "a" / "0.png").unlink()
    for f in (tmp_path / "val" / "a").iterdir():
        f.unlink()
    with pytest.raises(imagenet.DataError, match="holds no images"):
        imagenet.check_layout(tmp_path)


def test_transparency_pairs_rows_of_the_same_batch() -> None:
    from gpipe_bench import report

    res = accuracy_record

    lines = report.transparency(
        TABLE,
        [
            res("dataparallel-256", [40.0, 42.0, 41.0], "dataparallel"),
            res("pipeline-256", [41.5, 40.5, 42.5], "pipeline"),
            res("dataparallel-1k", [50.0, 50.2, 49.8], "dataparallel"),
            res("pipeline-1k", [60.0, 61.0, 59.0], "pipeline"),
            res("pipeline-4k", [80.0, 81.0], "pipeline"),
        ],
    )
    by_row = {line.split()[0]: line for line in lines}
    assert "within the data-parallel spread" in by_row["pipeline-256"]
    assert "OUTSIDE" in by_row["pipeline-1k"]
    assert "not judged" in by_row["pipeline-4k"]


def test_a_failing_replica_stops_the_row_with_its_error() -> None:
    import multiprocessing
    import time

    row = replace(TABLE.row("dataparallel-256", "quick"), batch=16, model_args={"no_such_argument": 1})
    job = Job(TABLE, row, replace(QUICK.settings, epochs=1), "quick", ["cpu", "cpu"], seeds=[0], timeout_s=120)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="replica .*no_such_argument"):
        accuracy.train(job, _data(32), seed=0)
    assert time.monotonic() - start < 120
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]


def test_compare_judges_each_pipeline_row_and_check_fails_when_one_leaves_the_spread(tmp_path: Path) -> None:
    """The bound is max(2 std, 0.5 points); a row outside it makes `compare --check` exit 1."""
    from click.testing import CliRunner

    from gpipe_bench import results
    from gpipe_bench.cli import main

    def save(name: str, samples: List[float], mode: str, root: Path) -> None:
        results.save(accuracy_record(name, samples, mode), root)

    def check(root: Path) -> Any:
        return CliRunner().invoke(main, ["compare", TABLE.name, "--check", "--results", str(root)])

    tight = tmp_path / "tight"
    save("dataparallel-256", [10.0, 10.1, 9.9], "dataparallel", tight)  # std 0.1: 2 std = 0.2, the floor 0.5 rules
    save("pipeline-256", [10.4, 10.5, 10.3], "pipeline", tight)  # +0.40 points: within
    result = check(tight)
    assert result.exit_code == 0, result.output
    assert "difference +0.40 points, judged by max(2 std, 0.5) = 0.50: within" in result.output

    save("pipeline-256", [10.6, 10.7, 10.5], "pipeline", tight)  # +0.60 points: outside
    result = check(tight)
    assert result.exit_code == 1, result.output
    assert "judged by max(2 std, 0.5) = 0.50: OUTSIDE the data-parallel spread" in result.output
    assert "1 regression(s)" in result.output


def test_the_published_recipe_runs_end_to_end_through_the_command_line(tmp_path: Path) -> None:
    """`gpipe-bench accuracy resnet101 --profile published --data DIR` on a generated ImageFolder of JPEGs.

    A copy of the configs keeps the published recipe (SGD with Nesterov momentum and weight
    decay, warm-up, lr scaling, the ImageNet transforms, the pipeline row's balance and
    checkpointing) and shrinks what only sets the scale: 32x32 crops, 2 classes, one epoch of
    two optimizer steps (8 training images in batches of 4, 2 micro-batches each).
    """
    import yaml
    from click.testing import CliRunner
    from PIL import Image

    from gpipe_bench import config
    from gpipe_bench.cli import main

    g = torch.Generator().manual_seed(0)
    data = tmp_path / "imagenet"
    for split, n in (("train", 4), ("val", 2)):
        for label in ("n01", "n02"):
            (data / split / label).mkdir(parents=True)
            for k in range(n):
                pixels = torch.randint(0, 256, (48, 40, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(data / split / label / f"{k}.JPEG", format="JPEG")
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in config.table_names():
        text = (config.config_dir() / f"{name}.yaml").read_text()
        if name == "resnet101-accuracy":
            spec = yaml.safe_load(text)
            spec["settings"].update(input_size=32, dataset_size=8, epochs=1, classes=2)
            spec["settings"]["extra"].update(val_size=4, val_resize=36, warmup_epochs=1, lr_milestones=[1])
            for row in spec["rows"]:
                row["batch"] = 4
                row["chunks"] = 2 if row["mode"] == "pipeline" else 1
            text = yaml.safe_dump(spec, sort_keys=False)
        (configs / f"{name}.yaml").write_text(text)
    out = tmp_path / "out"
    args = ["accuracy", "resnet101", "--profile", "published", "--experiment", "pipeline-256", "--seeds", "1"]
    result = CliRunner().invoke(
        main, [*args, "--data", str(data), "--output", str(out)], env={"GPIPE_BENCH_CONFIGS": str(configs)}
    )
    assert result.exit_code == 0, result.output
    files = list(out.rglob("pipeline-256.json"))
    assert len(files) == 1
    import json

    record = json.loads(files[0].read_text())
    assert record["status"] == "ok" and len(record["samples"]) == 1 and 0.0 <= record["samples"][0] <= 100.0
    assert record["settings"]["optimizer"]["nesterov"] is True and record["settings"]["balance"] == [140, 230]


def test_a_row_trains_in_its_precision_and_fp16_counts_its_skipped_steps() -> None:
    """bf16: the forward in bf16, the record says so. fp16 (torch's CPU autocast takes it; the harness runs it on
    GPUs): an overflow is skipped, not applied, and every seed's count is in the record."""
    job = _pipeline_row()
    bf16 = replace(job, row=replace(job.row, precision="bf16"))
    seen: List[torch.dtype] = []
    cross_entropy = F.cross_entropy

    def spy(logits: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(logits.dtype)
        return cross_entropy(logits, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "cross_entropy", spy)
        trained = accuracy.train(bf16, _data(32), seed=0)
    assert set(seen) == {torch.bfloat16} and trained.skipped == 0 and len(trained.errors) == 1
    record = accuracy.record(bf16, {0: trained.errors}, {0: 1.0}, {0: 0})
    assert record.settings["precision"] == "bf16" and "skipped_steps" not in record.extra
    fp16 = replace(job, row=replace(job.row, precision="fp16"))
    assert accuracy.record(fp16, {0: [50.0]}, {0: 1.0}, {0: 3}).extra["skipped_steps"] == {"0": 3}
