"""The linear-probe ceiling of fg-bench finetune's pretrained ViT on the digits: the features the pretraining left
(the class token before the head, `results/cpu/finetune/pretrained_vit.ckpt`), a logistic regression fitted on the 500
training images of seed 0's split, test accuracy on the 1,197 held-out ones. No network weight moves, so no
fine-tuning method that trains the head alone can beat it.

    python results/cpu/finetune-ceiling/probe.py
"""

import torch
from sklearn.linear_model import LogisticRegression

from fg_lightning.data import DigitsDataModule
from fg_lightning.finetune import pretrained
from fg_lightning.models import ViT


def features(model, images):
    seen = {}
    handle = model.heads.register_forward_pre_hook(lambda module, args: seen.update(features=args[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    return seen["features"].numpy()


data = DigitsDataModule(per_class=50, val_per_class=10, seed=0)
data.setup("fit")
data.setup("test")
train = [torch.cat(t) for t in zip(*data.train_dataloader())]
test = [torch.cat(t) for t in zip(*data.test_dataloader())]
model = pretrained(ViT(), "results/cpu/finetune/pretrained_vit.ckpt", skip=["heads.*"]).eval()
train_features, test_features = features(model, train[0]), features(model, test[0])
for c in (0.1, 1.0, 10.0, 100.0):
    probe = LogisticRegression(C=c, max_iter=5000).fit(train_features, train[1].numpy())
    print(f"C={c:g}: test accuracy {probe.score(test_features, test[1].numpy()):.3f}")
