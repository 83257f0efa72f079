"""The authors' conventions: --precision by device (fp16 with a gradient scaler on GPUs without
bf16), their flag names as aliases, their imagenet/train folder, a finished run not retrained
silently under other settings, --num_workers by the machine, photos on a CPU."""

import os

import pytest
import torch
from PIL import Image

import data
import dino
import knn_eval
import visualize

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
TINY = ["--arch", "vit_nano", "--patch_size", "8", "--out_dim", "64", "--hidden_dim", "64",
        "--bottleneck_dim", "32", "--batch_size", "8", "--local_crops_number", "2", "--device", "cpu",
        "--num_workers", "0", "--epochs", "1", "--precision", "fp32", "--time_limit", "0"]


# -- precision ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bf16_there, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_is_bf16_where_the_gpu_has_it_else_fp16(monkeypatch, bf16_there, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_there)
    assert dino.autocast_dtype("auto", GPU) == expected
    assert dino.autocast_dtype("auto", CPU) is None  # fp32 on CPUs, whatever the GPU
    assert dino.autocast_dtype("fp16", CPU) == torch.float16
    assert dino.autocast_dtype("fp32", GPU) is None and dino.autocast_dtype("bf16", GPU) == torch.bfloat16
    # the scaler goes with fp16 (built for the CPU here: without CUDA a CUDA scaler disables itself)
    assert dino.grad_scaler(dino.autocast_dtype("auto", GPU), CPU).is_enabled() == (not bf16_there)


def test_fp16_trainer_holds_an_enabled_scaler_and_fp32_a_disabled_one():
    assert dino.grad_scaler(torch.float16, CPU).is_enabled()
    assert not dino.grad_scaler(torch.bfloat16, CPU).is_enabled() and not dino.grad_scaler(None, CPU).is_enabled()


def tiny_step_setup():
    cfg = dino.Config(arch="vit_nano", patch_size=8, out_dim=64, hidden_dim=64, bottleneck_dim=32,
                      global_crops_size=32, local_crops_size=16, local_crops_number=2, drop_path_rate=0.0)
    torch.manual_seed(0)
    student, teacher = dino.build_networks(cfg, CPU)
    optimizer = dino.make_optimizer(cfg, student)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32),
             torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    at = dict(lr=1e-3, wd=0.04, momentum=0.99, teacher_temp=0.04, freeze_last_layer=False)
    return cfg, student, teacher, optimizer, views, at


def test_an_enabled_scaler_gives_the_step_without_one_when_nothing_overflows():
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu")):
        cfg, student, teacher, optimizer, views, at = tiny_step_setup()
        dino.train_step(student, teacher, torch.zeros(1, 64), views, optimizer, cfg, at, scaler)
        results.append([p.detach().clone() for p in student.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*results))
    assert any(not torch.equal(a, b) for a, b in zip(results[0], tiny_step_setup()[1].parameters()))


def test_an_inf_gradient_skips_the_step_and_lowers_the_scale():
    cfg, student, teacher, optimizer, views, at = tiny_step_setup()
    before = [p.detach().clone() for p in student.parameters()]
    first = next(p for p in student.parameters() if p.requires_grad)
    first.register_hook(lambda g: g * float("inf"))  # an fp16 overflow
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    dino.train_step(student, teacher, torch.zeros(1, 64), views, optimizer, cfg, at, scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert scaler.get_scale() == 2.0 ** 15


# -- the authors' flag names ----------------------------------------------------------------------

def test_the_authors_dino_flags_set_our_fields(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    cfg = dino.parse_config(["--data_path", "objects", "--batch_size_per_gpu", "8", "--pretrained_weights",
                             str(weights), "--use_fp16", "true", "--output_dir", str(tmp_path / "o")])
    assert (cfg.data, cfg.batch_size, cfg.init_from, cfg.precision, cfg.output_dir) == (
        "objects", 8, str(weights), "fp16", str(tmp_path / "o"))
    assert dino.parse_config(["--use_fp16", "false"]).precision == "fp32"
    with pytest.raises(data.DinoError, match="--use_fp16 maybe"):
        dino.parse_config(["--use_fp16", "maybe"])
    shown = dino.build_parser().format_help()
    for name in ("--data_path", "--batch_size_per_gpu", "--pretrained_weights", "--use_fp16", "--output_dir"):
        assert name in shown


def test_the_authors_knn_and_attention_flags_set_our_fields():
    args = knn_eval.build_parser().parse_args(
        ["--pretrained_weights", "w.pth", "--nb_knn", "10", "20", "--dump_features", "f.pth", "--data_path",
         "objects", "--batch_size_per_gpu", "16", "--checkpoint_key", "student"])
    assert (args.pretrained, args.k, args.save_features, args.data, args.batch_size, args.weights) == (
        "w.pth", [10, 20], "f.pth", "objects", 16, "student")
    shown = knn_eval.build_parser().format_help()
    assert all(n in shown for n in ("--pretrained_weights", "--nb_knn", "--dump_features", "--checkpoint_key"))
    args = visualize.build_parser().parse_args(["attention", "--image_path", "a.png", "--threshold", "0.5",
                                                "--pretrained_weights", "w.pth", "--output_dir", "o"])
    assert (args.image, args.share, args.pretrained, args.out) == (["a.png"], 0.5, "w.pth", "o")


# -- the authors' imagenet/train pointed at directly ----------------------------------------------

def class_folders(root, classes=("cat", "dog"), n=4):
    for c, name in enumerate(classes):
        for i in range(n):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (40 * i, 200 * c, 90)).save(root / name / f"{i}.png")
    return root


def test_a_folder_of_class_folders_only_is_read_as_labelled(tmp_path):
    train = class_folders(tmp_path / "imagenet" / "train")
    name, train_set, eval_set = data.load_data(str(train))
    assert data.has_labels(train_set) and train_set.classes == ["cat", "dog"] and eval_set is None
    assert train_set.labels.tolist() == [0] * 4 + [1] * 4
    class_folders(tmp_path / "imagenet" / "val", n=2)  # the authors' val/ beside it: evaluated on
    _, _, eval_set = data.load_data(str(train))
    assert eval_set is not None and len(eval_set) == 4
    Image.new("RGB", (32, 32)).save(train / "loose.png")  # an image beside the folders: no labels
    assert not data.has_labels(data.load_data(str(train))[1])


# -- a finished run is not retrained silently -----------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    folder = class_folders(root / "data" / "train", n=8)
    class_folders(root / "data" / "val", n=2)
    out = root / "run"
    assert dino.main(["--data", str(root / "data"), *TINY, "--output_dir", str(out)]) == 0
    return root / "data", out


def test_a_finished_run_under_other_settings_stops_naming_the_flag(finished, capsys):
    folder, out = finished
    with pytest.raises(data.DinoError, match=r"finished run with other settings \(--lr.*--output_dir.*--resume"):
        dino.main(["--data", str(folder), *TINY, "--output_dir", str(out), "--lr", "0.001"])
    capsys.readouterr()
    assert dino.main(["--data", str(folder), *TINY, "--output_dir", str(out), "--lr", "0.001", "--resume"]) == 0
    said = capsys.readouterr().out
    assert "warning: resumed with changed settings: lr" in said and "already trained" in said
    assert dino.main(["--data", str(folder), *TINY, "--output_dir", str(out)]) == 0  # the same: as before
    assert "changed settings" not in capsys.readouterr().out


# -- the machine's cores --------------------------------------------------------------------------

def test_num_workers_defaults_to_the_cores_at_most_4():
    expected = min(4, os.cpu_count() or 1)
    assert dino.Config().num_workers == expected
    help_text = " ".join(dino.build_parser().format_help().split())
    assert f"(4, or the cores) (default: {expected})" in help_text


# -- photos on a CPU ------------------------------------------------------------------------------

def test_photos_on_a_cpu_with_a_time_limit_get_the_cpu_recipe_and_without_one_the_paper():
    assert dino.preset_for(300, "photos") == {}  # the plain command: the paper's ViT-S/16 at 224 px
    recipe = dino.preset_for(300, "photos", time_limit=60)
    assert recipe["time_limit"] == 60 and recipe["global_crops_size"] == 64 and recipe["arch"] == "vit_nano"
    assert dino.preset_for(300, "photos", gpu=True, time_limit=60) == {}


def test_the_command_line_gives_photos_the_recipe_only_with_a_time_limit(tmp_path):
    for i in range(3):
        Image.new("RGB", (120, 100), (80 * i, 40, 90)).save(tmp_path / f"{i}.jpg")
    plain = dino.parse_config(["--data", str(tmp_path), "--device", "cpu"])
    assert (plain.arch, plain.patch_size, plain.global_crops_size, plain.time_limit) == ("vit_small", 16, 224, 0)
    hour = dino.parse_config(["--data", str(tmp_path), "--device", "cpu", "--time_limit", "60"])
    assert (hour.arch, hour.patch_size, hour.global_crops_size, hour.time_limit) == ("vit_nano", 8, 64, 60)
    assert "(default: vit_nano; paper: vit_small)" in " ".join(
        dino.build_parser(hour).format_help().split())


def test_photos_on_a_cpu_hear_how_long_before_step_0_and_what_to_type(monkeypatch):
    from types import SimpleNamespace
    monkeypatch.setattr(dino, "measure_step_seconds", lambda *a, **k: 60.0)
    cfg = dino.Config(data="my_photos")
    trainer = SimpleNamespace(cfg=cfg, device=CPU, total_steps=7800, start_epoch=0, start_step=0, steps_per_epoch=78)
    said = []
    dino.project_on_cpu(trainer, 300, said.append)
    assert "60.0 s/step x 7800 steps" in said[-1] and "5.4 days" in said[-1]
    assert "python dino.py --data my_photos --time_limit 60" in said[-1]
    said.clear()
    for quiet in (dict(time_limit=60.0), dict(steps=100)):  # a limit or a length given: no timing
        dino.project_on_cpu(SimpleNamespace(**{**vars(trainer), "cfg": dino.Config(**quiet)}), 300, said.append)
    dino.project_on_cpu(trainer, 32, said.append)  # small images: their preset
    assert said == []
