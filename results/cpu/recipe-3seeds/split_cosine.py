"""Per-layer cosine of local_activity (k=10) to the exact local gradient, block_size=2 recipe CNN: shared directions
vs directions split among a block's perturbed layers (monkeypatched draws)."""
import sys, torch, gzip, os
torch.set_num_threads(1)
from fg_lightning.engine import CNN
from fg_lightning.estimators import REGISTRY, cosine
from fg_lightning.estimators import local as L
root = "/usr/share/datasets/fashion-mnist"
def idx(name):
    path = [os.path.join(root, f) for f in os.listdir(root) if f.startswith(name)][0]
    return gzip.open(path).read() if path.endswith("gz") else open(path, "rb").read()
x_all = torch.frombuffer(bytearray(idx("train-images")[16:]), dtype=torch.uint8).view(-1, 1, 28, 28).float() / 255
x_all = (x_all - 0.2860) / 0.3530
y_all = torch.frombuffer(bytearray(idx("train-labels")[8:]), dtype=torch.uint8).long()
hp = int(sys.argv[1]) if len(sys.argv) > 1 else 1
net = CNN(seed=0, local_losses=True, groups=8, norm=True, block_size=2, head_pool=hp)
K = 10
est = REGISTRY["local_activity"].make(k=K, seed=1)
bp = REGISTRY["local_backprop"].make(seed=0)
outs = net.logit_layers()
slot = {}
for names, head in net.blocks:
    pert = [n for n in names if getattr(net, n).has_parameters and n not in outs]
    for i, n in enumerate(pert):
        slot[n] = (i, len(pert))
orig = L._ActivityTangents.draws
def split_draws(self, call, generator, into=None):
    i, n = slot[call.name]
    for j, u in enumerate(orig(self, call, generator, into)):
        if j % n != i:
            u.zero_()
        yield u
g = torch.Generator().manual_seed(0)
def measure(tag):
    for mode in ("shared", "split"):
        L._ActivityTangents.draws = orig if mode == "shared" else split_draws
        per = {}
        for s in range(4):
            i = torch.randint(0, 60000, (256,), generator=torch.Generator().manual_seed(100 + s))
            x, y = x_all[i], y_all[i]
            exact = est.exact_gradient(net, x, y)
            grads = est.estimate(net, x, y, s).grads
            for layer in ("conv1", "conv2", "conv3", "fc1"):
                keys = [k for k in exact if k.startswith(layer + ".")]
                per.setdefault(layer, []).append(cosine({k: grads[k] for k in keys}, {k: exact[k] for k in keys}))
            per.setdefault("all", []).append(cosine(grads, exact))
        print(tag, mode, {k: round(sum(v) / len(v), 3) for k, v in per.items()}, flush=True)
    L._ActivityTangents.draws = orig
measure("init")
for step in range(300):
    i = torch.randint(0, 60000, (256,), generator=g)
    grads = bp.estimate(net, x_all[i], y_all[i], step).grads
    with torch.no_grad():
        for name, p in net.named_parameters():
            p -= 0.1 * grads[name]
    if step in (299,):
        measure(f"after {step + 1}")
