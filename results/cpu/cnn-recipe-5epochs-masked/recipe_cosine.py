"""Mean cosine of local_activity (k=10) to the exact local gradient on the CNN with local losses (`recipe`: groups 8
and GroupNorm; `plain`: neither), over 4 Fashion-MNIST batches of 256, at initialisation and after 100 and 300 steps
of local_backprop SGD (lr 0.1). Usage: python recipe_cosine.py recipe|plain"""
import sys, torch, gzip, os
torch.set_num_threads(1)
from fg_lightning.engine import CNN
from fg_lightning.estimators import REGISTRY, cosine
root = "/usr/share/datasets/fashion-mnist"
def idx(name):
    path = [os.path.join(root, f) for f in os.listdir(root) if f.startswith(name)][0]
    data = gzip.open(path).read() if path.endswith("gz") else open(path, "rb").read()
    return data
imgs = idx("train-images"); labs = idx("train-labels")
x_all = torch.frombuffer(bytearray(imgs[16:]), dtype=torch.uint8).view(-1, 1, 28, 28).float() / 255
x_all = (x_all - 0.2860) / 0.3530
y_all = torch.frombuffer(bytearray(labs[8:]), dtype=torch.uint8).long()
variant = dict(groups=8, norm=True) if sys.argv[1] == "recipe" else {}
net = CNN(seed=0, local_losses=True, **variant)
est = REGISTRY["local_activity"].make(k=10, seed=1)
bp = REGISTRY["local_backprop"].make(seed=0)
g = torch.Generator().manual_seed(0)
def measure(tag):
    cs = []
    for s in range(4):
        i = torch.randint(0, 60000, (256,), generator=g)
        x, y = x_all[i], y_all[i]
        exact = est.exact_gradient(net, x, y)
        cs.append(cosine(est.estimate(net, x, y, s).grads, exact))
    print(tag, sys.argv[1], round(sum(cs) / len(cs), 3), flush=True)
measure("init")
for step in range(300):
    i = torch.randint(0, 60000, (256,), generator=g)
    grads = bp.estimate(net, x_all[i], y_all[i], step).grads
    with torch.no_grad():
        for name, p in net.named_parameters():
            p -= 0.1 * grads[name]
    if step in (99, 299):
        measure(f"after {step + 1} local_backprop steps")
