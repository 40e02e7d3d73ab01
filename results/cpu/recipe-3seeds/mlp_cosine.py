import sys, json, torch, gzip, os
torch.set_num_threads(1)
from fg_lightning.engine import MLP
from fg_lightning.estimators import REGISTRY, cosine
root = "/usr/share/datasets/fashion-mnist"
def idx(name):
    path = [os.path.join(root, f) for f in os.listdir(root) if f.startswith(name)][0]
    return gzip.open(path).read() if path.endswith("gz") else open(path, "rb").read()
x_all = torch.frombuffer(bytearray(idx("train-images")[16:]), dtype=torch.uint8).view(-1, 784).float() / 255
x_all = (x_all - 0.2860) / 0.3530
y_all = torch.frombuffer(bytearray(idx("train-labels")[8:]), dtype=torch.uint8).long()
bp = REGISTRY["local_backprop"].make(seed=0)
est = REGISTRY["local_activity"].make(k=10, seed=1)
g = torch.Generator().manual_seed(0)
nets = {v: MLP(**({"seed": 0, "local_losses": True} | json.loads(v))) for v in sys.argv[1:]}
def measure(tag):
    for v, net in nets.items():
        per = {}
        for s in range(4):
            i = torch.randint(0, 60000, (256,), generator=torch.Generator().manual_seed(100 + s))
            exact = est.exact_gradient(net, x_all[i], y_all[i]); grads = est.estimate(net, x_all[i], y_all[i], s).grads
            for layer in ("fc1", "fc2"):
                keys = [k for k in exact if k.startswith(layer + ".")]
                per.setdefault(layer, []).append(cosine({k: grads[k] for k in keys}, {k: exact[k] for k in keys}))
        print(tag, v, {k: round(sum(x) / len(x), 3) for k, x in per.items()}, flush=True)
measure("init")
for step in range(300):
    i = torch.randint(0, 60000, (256,), generator=g)
    for net in nets.values():
        grads = bp.estimate(net, x_all[i], y_all[i], step).grads
        with torch.no_grad():
            for name, p in net.named_parameters():
                p -= 0.1 * grads[name]
measure("after 300")
