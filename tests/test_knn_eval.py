"""knn_eval.py against oracles: a hand-worked vote, a brute-force pure-Python k-NN, the pixel
baseline recomputed by hand, separable features for the linear probe, and saved weights."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import dino
import knn_eval
import vit

ROOT = Path(__file__).resolve().parents[1]


def brute_force_knn(train, train_labels, test, k, T, num_classes):
    """The weighted k-NN in plain Python lists and loops: class scores, one list per test point."""
    train, train_labels, test = train.tolist(), train_labels.tolist(), test.tolist()
    all_scores = []
    for q in test:
        neighbours = []
        for x, y in zip(train, train_labels):
            dot = sum(a * b for a, b in zip(q, x))
            norms = math.sqrt(sum(a * a for a in q)) * math.sqrt(sum(b * b for b in x))
            neighbours.append((dot / norms, y))
        neighbours.sort(key=lambda n: -n[0])
        scores = [0.0] * num_classes
        for s, y in neighbours[:k]:
            scores[y] += math.exp(s / T)
        all_scores.append(scores)
    return all_scores


def brute_force_accuracy(all_scores, labels):
    """(top-1, top-5) in percent; ties between classes go to the lower class index."""
    top1 = top5 = 0
    for scores, y in zip(all_scores, labels.tolist()):
        order = sorted(range(len(scores)), key=lambda c: (-scores[c], c))
        top1 += order[0] == y
        top5 += y in order[:5]
    return 100 * top1 / len(labels), 100 * top5 / len(labels)


def random_features(n, dim, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    return x, torch.randint(num_classes, (n,), generator=g)


# -- weighted k-NN -----------------------------------------------------------------------------------

def test_weighted_vote_overrules_the_majority_by_hand():
    # query q = (1, 0); training points at cosine similarity 1 (class 0), 0.5 and 0.5 (class 1),
    # and -1 (class 0). With k = 3 the majority of the 3 nearest is class 1 (two votes to one).
    r = math.sqrt(3) / 2
    train = torch.tensor([[1.0, 0.0], [0.5, r], [0.5, -r], [-1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    # by hand with T = 0.5: score(0) = e^{1/0.5} = e² ≈ 7.389, score(1) = 2 e^{0.5/0.5} = 2e ≈ 5.437
    scores = knn_eval.knn_scores(train, labels, query, k=3, temperature=0.5)
    torch.testing.assert_close(scores, torch.tensor([[math.e ** 2, 2 * math.e]], dtype=torch.float64))
    majority = torch.mode(labels[:3]).values.item()
    assert majority == 1 and scores.argmax().item() == 0
    assert knn_eval.knn_accuracy(train, labels, query, torch.tensor([0]), k=3, temperature=0.5) == (100.0, 100.0)
    assert knn_eval.knn_accuracy(train, labels, query, torch.tensor([1]), k=3, temperature=0.5)[0] == 0.0
    # k = 4 adds the opposite point: e^{-1/0.5} = e^{-2} to class 0
    scores = knn_eval.knn_scores(train, labels, query, k=4, temperature=0.5)
    torch.testing.assert_close(scores, torch.tensor([[math.e ** 2 + math.e ** -2, 2 * math.e]],
                                                    dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 5, 20, 60, 500])  # 500 > N_train: every training point votes
@pytest.mark.parametrize("T", [0.07, 0.5])
def test_knn_equals_a_brute_force_loop(k, T):
    train, train_y = random_features(60, 6, 7, seed=0)
    test, test_y = random_features(25, 6, 7, seed=1)
    expected = brute_force_knn(train, train_y, test, k, T, 7)
    scores = knn_eval.knn_scores(train, train_y, test, k=k, temperature=T, num_classes=7)
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64))
    top1, top5 = knn_eval.knn_accuracy(train, train_y, test, test_y, k=k, temperature=T, num_classes=7)
    assert (top1, top5) == pytest.approx(brute_force_accuracy(expected, test_y))


def test_seven_test_images_three_classes_any_chunking():
    train, train_y = random_features(20, 4, 3, seed=2)
    test, test_y = random_features(7, 4, 3, seed=3)
    whole = knn_eval.knn_scores(train, train_y, test, k=5, temperature=0.07, num_classes=3, chunk_size=1024)
    for chunk in (1, 2, 3, 7):  # 3 leaves a remainder chunk of one image
        # the same neighbours and votes; BLAS may round a 1-row product differently in the last bit
        chunked = knn_eval.knn_scores(train, train_y, test, k=5, temperature=0.07, num_classes=3, chunk_size=chunk)
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)
        assert knn_eval.knn_accuracy(train, train_y, test, test_y, k=5, num_classes=3, chunk_size=chunk) \
            == knn_eval.knn_accuracy(train, train_y, test, test_y, k=5, num_classes=3)
    top1, top5 = knn_eval.knn_accuracy(train, train_y, test, test_y, k=5, num_classes=3)
    expected = brute_force_accuracy(brute_force_knn(train, train_y, test, 5, 0.07, 3), test_y)
    assert top1 == pytest.approx(expected[0])
    assert round(top1 * 7 / 100, 6) == round(top1 * 7 / 100)  # a whole number of the 7 images
    assert top5 == 100.0  # 3 classes: the true class is always among the "top 5"


def test_top5_with_fewer_than_five_classes_and_votes():
    # 6 classes, k = 1: one class gets a vote, the 5 others tie at 0 and are ranked by index
    train = torch.eye(6, dtype=torch.float64)
    labels = torch.arange(6)
    test = torch.tensor([[1.0, 0, 0, 0, 0, 0]] * 3, dtype=torch.float64)
    # true classes 0 (the vote), 4 (4th of the tied zeros: rank 4) and 5 (rank 5, outside the top 5)
    top1, top5 = knn_eval.knn_accuracy(train, labels, test, torch.tensor([0, 4, 5]), k=1)
    assert top1 == pytest.approx(100 / 3) and top5 == pytest.approx(200 / 3)
    assert knn_eval.knn_accuracy(train[:2], labels[:2], test, torch.tensor([0, 1, 1]), k=1) == \
        pytest.approx((100 / 3, 100.0))


def test_many_classes_beyond_1000():
    train, _ = random_features(3000, 16, 2, seed=4)
    labels = torch.arange(3000) % 1500  # 1500 classes; the authors' code assumes 1000
    scores = knn_eval.knn_scores(train, labels, train[:50], k=1, num_classes=1500)
    assert scores.shape == (50, 1500)
    # each test point is a training point, so its nearest neighbour is itself (s = 1)
    assert knn_eval.knn_accuracy(train, labels, train[:50], labels[:50], k=1)[0] == 100.0


def test_sweep_over_k_equals_one_k_at_a_time():
    train, train_y = random_features(300, 8, 5, seed=5)
    test, test_y = random_features(40, 8, 5, seed=6)
    sweep = knn_eval.knn_sweep(train, train_y, test, test_y, ks=(10, 20, 100, 200), chunk_size=16)
    for k in (10, 20, 100, 200):
        assert sweep[k] == knn_eval.knn_accuracy(train, train_y, test, test_y, k=k)


# -- features ------------------------------------------------------------------------------------

def test_probe_features_hold_the_knn_feature_and_the_last_blocks():
    torch.manual_seed(0)
    backbone = vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2).eval()
    x = torch.randn(5, 3, 16, 16)
    batches = [(x[:3], torch.tensor([0, 1, 2])), (x[3:], torch.tensor([1, 0]))]
    knn_f, labels = knn_eval.extract_features(backbone, batches, "cpu")
    knn_g, probe, labels_g = knn_eval.extract_probe_features(backbone, batches, "cpu", n_last_blocks=2,
                                                             avgpool=True)
    torch.testing.assert_close(knn_g, knn_f)
    assert torch.equal(labels_g, labels)
    assert probe.shape == (5, 3 * 32)  # 2 [CLS] tokens + 1 mean patch token
    with torch.no_grad():
        layers = backbone.get_intermediate_layers(x, 3)
        torch.testing.assert_close(probe[:, :32], layers[1][:, 0])  # [CLS] of the 2nd-last block
        torch.testing.assert_close(probe[:, 32:64], backbone(x))  # the final [CLS], unnormalised
        torch.testing.assert_close(probe[:, 64:], layers[2][:, 1:].mean(1))


def test_raw_pixel_features_by_hand():
    train, test = data.make_shapes(40, seed=0), data.make_shapes(9, seed=1)
    train_f, train_y, test_f, test_y = knn_eval.raw_pixel_features(
        data.eval_batches(train, 32, batch_size=16), data.eval_batches(test, 32, batch_size=16))
    x_train = train.images.reshape(40, -1).double() / 255  # (N, 3·32·32)
    x_test = test.images.reshape(9, -1).double() / 255
    mu = x_train.mean(0)
    expected = (x_test - mu) / (x_test - mu).norm(dim=1, keepdim=True)
    torch.testing.assert_close(test_f, expected.float(), atol=1e-6, rtol=0)
    expected = (x_train - mu) / (x_train - mu).norm(dim=1, keepdim=True)
    torch.testing.assert_close(train_f, expected.float(), atol=1e-6, rtol=0)
    assert torch.equal(train_y, train.labels) and torch.equal(test_y, test.labels)


# -- linear probe ----------------------------------------------------------------------------------

def test_linear_probe_separates_linearly_separable_features():
    g = torch.Generator().manual_seed(123)  # not the probe's seed 0, whose init would copy `means`
    num_classes, dim = 5, 32
    means = 3 * torch.randn(num_classes, dim, generator=g)

    def sample(n):
        y = torch.randint(num_classes, (n,), generator=g)
        return means[y] + torch.randn(n, dim, generator=g), y

    (train_x, train_y), (test_x, test_y) = sample(500), sample(200)
    probe = knn_eval.train_linear_probe(train_x, train_y, num_classes, epochs=10, lr=0.05, batch_size=100)
    top1, _ = knn_eval.probe_accuracy(probe, test_x, test_y)
    assert top1 >= 99.0
    untrained = knn_eval.train_linear_probe(train_x, train_y, num_classes, epochs=1, lr=1e-9)
    assert knn_eval.probe_accuracy(untrained, test_x, test_y)[0] < 60  # the training did the work


# -- command line ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A small image-folder data set: 3 classes, 8 training and 7 validation images of 32 px."""
    from PIL import Image
    root = tmp_path_factory.mktemp("images")
    shapes = data.make_shapes(200, seed=0)
    for split, per_class, offset in (("train", [3, 3, 2], 0), ("val", [3, 2, 2], 100)):
        for c, n in enumerate(per_class):
            (root / split / f"class{c}").mkdir(parents=True)
            picks = (shapes.labels[offset:] == c).nonzero().flatten()[:n] + offset
            for i in picks.tolist():
                Image.fromarray(shapes.images[i].permute(1, 2, 0).numpy()).save(
                    root / split / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = dino.make_config(dict(arch="vit_nano", patch_size=8, out_dim=16, hidden_dim=16,
                                bottleneck_dim=8), 32, "shapes")
    student, teacher = dino.build_networks(cfg, "cpu")
    with torch.no_grad():  # a student unlike the teacher, so --weights matters
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("run") / "checkpoint.pth"
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(),
                "config": dino.config_to_dict(cfg), "epoch": 1}, path)
    return path, student, teacher


def run_main(*args):
    lines = []
    assert knn_eval.main([str(a) for a in args], log=lines.append) == 0
    return lines


def test_command_line_on_a_checkpoint_matches_the_functions(image_folder, run_checkpoint, tmp_path):
    path, student, teacher = run_checkpoint
    _, train, evaluation = data.load_data(str(image_folder))
    for weights, model in (("teacher", teacher), ("student", student)):
        backbone = model.backbone.eval()
        train_f, train_y = knn_eval.extract_features(backbone, data.eval_batches(train, 32), "cpu")
        test_f, test_y = knn_eval.extract_features(backbone, data.eval_batches(evaluation, 32), "cpu")
        expected = knn_eval.knn_accuracy(train_f, train_y, test_f, test_y, k=3, num_classes=3)
        lines = run_main("--checkpoint", path, "--data", image_folder, "--weights", weights,
                         "--device", "cpu", "--k", "3", "1", "--save_features", tmp_path / f"{weights}.pth")
        assert lines[-1] == f"knn top1@3={expected[0]:.2f}"
        assert f"{weights} backbone" in lines[0] and "vit_nano/8, 32 px" in lines[0]
        assert any(l.startswith("time: features") and "peak memory" in l for l in lines)
        assert f"    3  {expected[0]:>7.2f}  {expected[1]:>7.2f}" in lines

    # a sweep over k and T from the saved features, with no data and no network
    saved = torch.load(tmp_path / "teacher.pth", weights_only=True)
    expected = knn_eval.knn_accuracy(saved["train_features"], saved["train_labels"],
                                     saved["test_features"], saved["test_labels"], k=20, temperature=0.5, num_classes=3)
    lines = run_main("--load_features", tmp_path / "teacher.pth", "--k", "5", "20", "--temperature", "0.5",
                     "--device", "cpu")
    assert lines[-1] == f"knn top1@8={expected[0]:.2f}"  # k = 20 is cut to the 8 training images
    with pytest.raises(data.DinoError, match="without --linear"):
        run_main("--load_features", tmp_path / "teacher.pth", "--linear")


def test_command_line_linear_probe_and_raw_pixels(image_folder, run_checkpoint):
    path, _, _ = run_checkpoint
    lines = run_main("--checkpoint", path, "--data", image_folder, "--device", "cpu", "--linear",
                     "--n_last_blocks", "2", "--avgpool", "--epochs", "3")
    assert any("linear probe on [CLS] of the last 2 block(s) + mean patch token (192-d)" in l for l in lines)
    assert lines[-2].startswith("linear top1=") and lines[-1].startswith("knn top1@8=")  # 8 training images
    lines = run_main("--raw_pixels", "--data", image_folder, "--k", "1")
    assert "raw pixels (32 px centre views)" in lines[0]
    assert lines[-1].startswith("knn top1@1=")


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "knn_eval.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_bad_input_gives_one_line_errors(tmp_path):
    torch.save({"model": torch.zeros(3)}, tmp_path / "other.pth")
    (tmp_path / "random.pth").write_bytes(torch.randint(0, 256, (1000,), dtype=torch.uint8).numpy().tobytes())
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.zeros(64),
              "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(1000, 2048)}
    torch.save(resnet, tmp_path / "resnet50.pth")
    (tmp_path / "no_val" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "no_val" / "train" / "cat" / "0.png").write_bytes(b"an image")
    cases = [(["--checkpoint", tmp_path / "other.pth"], "is not a DINO checkpoint"),
             (["--checkpoint", tmp_path / "random.pth"], "is not a PyTorch checkpoint"),
             (["--pretrained", tmp_path / "resnet50.pth"], "holds no ViT backbone"),
             (["--raw_pixels", "--data", tmp_path / "no_val"], "has no evaluation split")]
    for args, message in cases:
        result = run_cli(*args)
        lines = [l for l in result.stderr.splitlines() if l.strip()]
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
