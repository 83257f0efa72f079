"""Weighted k-NN evaluation of frozen features (DINO paper Section 4.1; Wu et al. 2018).

The same functions serve dino.py's k-NN monitor and this file's command line.
"""

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(backbone, batches, device):
    """L2-normalised backbone features for an iterable of (images, labels) batches."""
    feats, labels = [], []
    for x, y in batches:
        f = backbone(x.to(device, non_blocking=True)).float()
        feats.append(F.normalize(f, dim=1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_scores(train_features, train_labels, test_features, k=20, T=0.07, num_classes=None,
               chunk_size=1024):
    """Class scores (N_test, C) of the weighted k-NN vote; features must be L2-normalised.

    Works for any number of classes and test images; memory is bounded by chunk_size x N_train.
    """
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train_labels))
    scores = []
    for start in range(0, len(test_features), chunk_size):
        q = test_features[start:start + chunk_size]
        # s_i = cos(x, x_i), the cosine similarity to every training feature
        s = q @ train_features.T  # (chunk, N_train)
        s_top, idx = s.topk(k, dim=1)  # (chunk, k)
        y_top = train_labels[idx]  # (chunk, k)
        # $$\mathrm{score}(c) = \sum_{i \in \text{top-}k,\ y_i = c} \exp(s_i / T)$$
        votes = torch.zeros(len(q), num_classes, dtype=s.dtype, device=s.device)
        votes.scatter_add_(1, y_top, torch.exp(s_top / T))
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=20, T=0.07,
                 num_classes=None, chunk_size=1024):
    """(top-1, top-5) accuracy in percent of the weighted k-NN classifier."""
    scores = knn_scores(train_features, train_labels, test_features, k, T, num_classes, chunk_size)
    ranked = scores.argsort(dim=1, descending=True)
    test_labels = torch.as_tensor(test_labels)
    top1 = (ranked[:, 0] == test_labels).float().mean().item() * 100
    top5 = (ranked[:, :5] == test_labels[:, None]).any(1).float().mean().item() * 100
    return top1, top5
