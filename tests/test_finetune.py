"""Fine-tuning pretrained torch models on the torch backend: a trained subset (names or patterns), PEFT LoRA adapters,
starting weights from a checkpoint, and transformers from torchvision, timm and Hugging Face built offline from small
configurations: every weight estimator exact on the parameters that train (the jvp along their basis is autograd's
gradient), activity perturbation unbiased or refused in one line; bad input refused in one line."""

from __future__ import annotations

import os
import re

import lightning.pytorch as pl
import pytest
import torch
from test_estimators import in_threads
from torch import nn
from torch.utils.data import DataLoader

from fg_lightning.estimators import REGISTRY, Backprop, MultiDirection, ZerothOrder
from fg_lightning.estimators.base import batch_size
from fg_lightning.engine import MLP, GivenTangents
from fg_lightning.finetune import CheckpointError, lora, pretrained
from fg_lightning.models import ViT
from fg_lightning.module import ForwardGradientModule
from fg_lightning.torch_network import TorchNetwork


def basis_error(network: TorchNetwork, x, labels) -> float:
    """Relative error of the jvp along the basis of the trained parameters against autograd's gradient."""
    params = dict(network.named_parameters())
    n = sum(p.numel() for p in params.values())
    assert 0 < n <= 400
    eye, offset, tangents = torch.eye(n, dtype=torch.float64), 0, {}
    for name, p in params.items():
        tangents[name] = eye[:, offset:offset + p.numel()].reshape(n, *p.shape).to(p.dtype)
        offset += p.numel()
    torch.manual_seed(0)
    _, _, exact = network.loss_and_grad(x, labels)
    torch.manual_seed(0)
    derivs = network.jvp(x, labels, GivenTangents(tangents)).dir_derivs
    reference = torch.cat([exact[name].flatten() for name in params])
    assert float(reference.norm()) > 0
    return float((derivs - reference).norm() / reference.norm())


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    model = ViT(num_layers=1, hidden_dim=8, mlp_dim=16, num_heads=2).double()
    nn.init.normal_(model.heads.head.weight, std=0.3)  # torchvision starts the head at zero: no gradient upstream
    return model


def images(batch: int = 4, size: int = 28):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 1, size, size, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (batch,), generator=generator))


def test_a_trained_subset_by_pattern_freezes_the_rest():
    model = small_vit()
    network = TorchNetwork(model, trainable=["heads.*", "encoder.layers.*.mlp.3.*"])
    names = [name for name, _ in network.named_parameters()]
    assert names == ["encoder.layers.encoder_layer_0.mlp.3.weight", "encoder.layers.encoder_layer_0.mlp.3.bias",
                     "heads.head.weight", "heads.head.bias"]
    assert not model.conv_proj.weight.requires_grad
    assert basis_error(network, *images()) < 1e-10
    module = ForwardGradientModule(small_vit(), REGISTRY["naive"].make(), trainable=["heads.*"])
    assert sum(p.numel() for group in module.configure_optimizers().param_groups for p in group["params"]) == 8 * 10 + 10


def test_bad_subsets_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"trainable pattern\(s\) \['head\.\*'\] match no parameter") as info:
        TorchNetwork(small_vit(), trainable=["heads.*", "head.*"])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="list of parameter names"):
        TorchNetwork(small_vit(), trainable="heads.*")
    with pytest.raises(ValueError, match="leave loss, num_classes and trainable out"):
        ForwardGradientModule(MLP(seed=0), Backprop(), trainable=["fc1.*"])


@pytest.mark.parametrize("estimator", ["naive", "multi_direction", "input_qr", "momentum", "activity"])
def test_lora_adapters_alone_train_and_the_base_stays(estimator):
    """PEFT LoRA on torchvision's ViT: the adapters are the trained parameters (the jvp along their basis is autograd's
    gradient); a few SGD steps of each estimator move them and leave every base weight as it was."""
    pytest.importorskip("peft")
    model = lora(small_vit(), target_modules=["mlp.0", "mlp.3"], r=2)
    network = TorchNetwork(model)
    names = [name for name, _ in network.named_parameters()]
    assert names and all("lora_" in name for name in names)
    with torch.no_grad():
        for _, p in network.named_parameters():
            p.normal_(0, 0.1)  # lora_B starts at zero, where the derivatives of lora_A are zero
    assert basis_error(network, *images()) < 1e-10
    base = {name: p.clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapters = {name: p.clone() for name, p in network.named_parameters()}
    spec = REGISTRY[estimator]
    kwargs = {"exact_output": False} if estimator == "activity" else {}
    made = spec.make(k=2, **kwargs) if spec.takes_k else spec.make(**kwargs)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3)
    x, labels = images()
    for step in range(2):
        grads = made.estimate(network, x, labels, step).grads
        for name, p in network.named_parameters():
            p.grad = grads[name]
        optimizer.step()
    assert all(torch.equal(p, base[name]) for name, p in model.named_parameters() if name in base)
    assert any(not torch.equal(p, adapters[name]) for name, p in network.named_parameters())


def test_pretrained_weights_load_from_a_checkpoint_and_a_misfit_is_refused(tmp_path):
    source = small_vit()
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"network.module.{k}": v for k, v in source.state_dict().items()}}, path)
    torch.manual_seed(5)
    loaded = pretrained(ViT(num_layers=1, hidden_dim=8, mlp_dim=16, num_heads=2).double(), str(path))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))
    plain = tmp_path / "weights.pt"
    torch.save(source.state_dict(), plain)
    pretrained(ViT(num_layers=1, hidden_dim=8, mlp_dim=16, num_heads=2).double(), str(plain))
    for model, file, words in (
        (ViT(num_layers=2, hidden_dim=8, mlp_dim=16, num_heads=2), path, "missing ['encoder.layers.encoder_layer_1"),
        (ViT(num_layers=1, hidden_dim=8, mlp_dim=16, num_heads=2, num_classes=5), path, "of another shape"),
        (small_vit(), tmp_path / "nothing.ckpt", "is not a file"),
    ):
        with pytest.raises(CheckpointError, match=re.escape(words)) as info:
            pretrained(model, str(file))
        assert "\n" not in str(info.value)
    # a new head for a new task: `skip` leaves it as the model made it (a 5-class head from a 10-class checkpoint)
    fresh = ViT(num_layers=1, hidden_dim=8, mlp_dim=16, num_heads=2, num_classes=5).double()
    head = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("heads.")}
    pretrained(fresh, str(path), skip=["heads.*"])
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, head[name] if name in head else source.state_dict()[name]), name
    for skip, words in ((["head.*"], "skip pattern(s) ['head.*'] match no weight"), ("heads.*", "skip must be a list")):
        with pytest.raises(CheckpointError, match=re.escape(words)):
            pretrained(small_vit(), str(path), skip=skip)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be loaded") as info:
        pretrained(small_vit(), str(garbage))
    assert "\n" not in str(info.value)


def _hf_vit():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=8, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=8, num_labels=3)
    return (transformers.ViTForImageClassification(config).double(),
            ["classifier.*", "*.q_proj.*", "*.fc2.*", "vit.embeddings.cls_token"], images(size=8))


BERT_TRAINABLE = ["classifier.*", "*.attention.self.query.*", "bert.pooler.*"]


def tiny_bert(**config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=8, max_position_embeddings=16, num_labels=3, **config)
    return transformers.BertForSequenceClassification(config).double()


def token_batch(batch: int = 4, length: int = 6, seed: int = 1):
    """A Hugging Face batch, a dict as a tokenizer pads it: ``input_ids`` (1..19, 0 where padded), an
    ``attention_mask`` whose rows keep ``length``, ``length - 1`` and ``length - 3`` tokens in turn (two rows in three
    padded), ``token_type_ids``; and labels, the first token's id mod 3 (learnable)."""
    generator = torch.Generator().manual_seed(seed)
    kept = length - torch.tensor([0, 1, 3])[torch.arange(batch) % 3]
    attention_mask = (torch.arange(length) < kept[:, None]).long()
    input_ids = torch.randint(1, 20, (batch, length), generator=generator) * attention_mask
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)}
    return inputs, input_ids[:, 0] % 3


def _hf_bert():
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 20, (4, 6), generator=generator), torch.randint(0, 3, (4,), generator=generator)
    return tiny_bert(), BERT_TRAINABLE, batch


def padded_bert():
    """:func:`tiny_bert` with weights drawn at 0.5 (BERT's 0.02 gives near-uniform attention and logits near zero):
    the attention_mask moves the padded rows' logits by a few percent, and 30 forward-gradient steps learn."""
    return tiny_bert(initializer_range=0.5)


def _hf_bert_dict():
    return padded_bert(), BERT_TRAINABLE, token_batch()


def _timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, in_chans=1,
                              num_classes=3, depth=1, embed_dim=8, num_heads=2)
    return model.double(), ["head.*", "blocks.0.attn.qkv.*"], images(size=8)


@pytest.mark.parametrize("make", [_hf_vit, _hf_bert, _hf_bert_dict, _timm_vit],
                         ids=["hf_vit", "hf_bert", "hf_bert_dict", "timm_vit"])
def test_transformers_from_the_hubs_libraries_are_exact_offline(make):
    """Hugging Face models (a ModelOutput's logits through the backend's one adapter; token ids as input, or a dict of
    token ids, a padding attention_mask and token types passed as keyword arguments) and timm's ViT (fused attention,
    run on the math kernel), built from small configurations: the jvp along the trained subset's basis is autograd's
    gradient; every weight estimator and activity perturbation run."""
    model, trainable, (x, labels) = make()
    network = TorchNetwork(model, num_classes=3, trainable=trainable)
    assert basis_error(network, x, labels) < 1e-10
    for name in ("naive", "input_qr", "partition", "activity"):
        grads = REGISTRY[name].make(k=2).estimate(network, x, labels, 0).grads
        assert all(torch.isfinite(g).all() for g in grads.values())


def test_a_dict_input_goes_to_the_model_as_keyword_arguments():
    """The adapter calls ``model(**x)``: the network's logits are the model's own on a padded batch, where the
    attention_mask matters (without it the padded rows' logits differ, the others' do not)."""
    model = padded_bert().eval()
    x, _ = token_batch()
    padded = x["attention_mask"].min(1).values == 0
    assert 0 < int(padded.sum()) < len(padded)
    with torch.no_grad():
        logits = TorchNetwork(model, num_classes=3)(x)
        torch.testing.assert_close(logits, model(**x).logits, rtol=0, atol=0)
        unmasked = model(input_ids=x["input_ids"], token_type_ids=x["token_type_ids"]).logits
    assert float((unmasked - logits)[padded].abs().amin()) > 1e-3
    torch.testing.assert_close(unmasked[~padded], logits[~padded])


def test_zeroth_orders_central_difference_is_the_directional_derivative_on_a_dict_input():
    """ZerothOrder (k = 1, dropout on: every forward from one random state) on a padded dict batch: its loss difference
    ``(L(θ+εz) − L(θ−εz)) / 2ε`` is the forward-mode derivative along its ``z`` (its estimate ``ĝ = difference · z``
    over the difference)."""
    network = TorchNetwork(padded_bert(), num_classes=3, trainable=BERT_TRAINABLE)
    x, labels = token_batch()
    torch.manual_seed(0)
    estimate = ZerothOrder(k=1, eps=1e-5, seed=3).estimate(network, x, labels, 0)
    difference = float(estimate.grads.weights[0])
    directions = {name: (grad / difference).unsqueeze(0) for name, grad in estimate.grads.items()}
    torch.manual_seed(0)
    derivative = float(network.jvp(x, labels, GivenTangents(directions)).dir_derivs[0])
    assert abs(derivative) > 1e-3
    assert difference == pytest.approx(derivative, rel=1e-7)


def test_two_ranks_of_dict_batches_take_the_union_batch_update():
    """ZerothOrder (forward passes only: two threads may run it) on a dict batch split 3 + 5 over two ranks: the
    update of one process on the union batch, each rank's batch mean weighted by its dict's dim 0."""
    x, labels = token_batch(batch=8)
    networks = [TorchNetwork(padded_bert().eval(), num_classes=3, trainable=BERT_TRAINABLE) for _ in range(3)]
    parts = [slice(0, 3), slice(3, 8)]

    def estimate(comm):
        rows = parts[comm.rank]
        part = {key: value[rows] for key, value in x.items()}
        return dict(ZerothOrder(k=2, seed=3).estimate(networks[comm.rank], part, labels[rows], 0, comm).grads)

    ranks = in_threads(estimate)
    single = ZerothOrder(k=2, seed=3).estimate(networks[2], x, labels, 0).grads
    for name, grad in single.items():
        for rank in ranks:
            torch.testing.assert_close(rank[name], grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("name", ["multi_direction", "zeroth_order"])
def test_a_short_training_on_dict_batches_lowers_the_loss(name):
    """ForwardGradientModule under a Trainer on a synthetic padded token dataset (dict inputs through the default
    collate, Lightning's batch transfer and the module's step): 30 SGD steps on the trained subset lower the loss."""
    model = padded_bert()
    x, labels = token_batch(batch=48, seed=2)

    def loss():
        model.eval()
        with torch.no_grad():
            value = float(nn.functional.cross_entropy(model(**x).logits, labels))
        model.train()
        return value

    before = loss()
    module = ForwardGradientModule(model, REGISTRY[name].make(k=4, seed=0), lambda p: torch.optim.SGD(p, lr=0.1),
                                   num_classes=3, trainable=BERT_TRAINABLE)
    examples = [({key: value[i] for key, value in x.items()}, labels[i]) for i in range(len(labels))]
    pl.Trainer(max_steps=30, logger=False, enable_model_summary=False, enable_checkpointing=False,
               enable_progress_bar=False, accelerator="cpu").fit(
        module, DataLoader(examples, batch_size=16, shuffle=True))
    after = loss()
    print(f"{name}: loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.2, (before, after)


def test_dict_values_that_disagree_on_the_batch_are_refused_in_one_line():
    """Before any update, naming every key's dim 0: by the estimator (MultiDirection, and ZerothOrder, which moves the
    parameters before its first forward) or by the network's adapter (Backprop's loss_and_grad); an empty dict too."""
    x, labels = token_batch()
    bad = {**x, "attention_mask": x["attention_mask"][:3]}
    sizes = re.escape("{'input_ids': 4, 'attention_mask': 3, 'token_type_ids': 4}")
    network = TorchNetwork(padded_bert(), num_classes=3, trainable=BERT_TRAINABLE)
    before = {name: p.clone() for name, p in network.named_parameters()}
    for estimator in (MultiDirection(k=2), ZerothOrder(k=2), Backprop()):
        with pytest.raises(ValueError, match=f"batch sizes \\(dim 0\\) are {sizes}$") as info:
            estimator.estimate(network, bad, labels, 0)
        assert "\n" not in str(info.value)
        assert all(torch.equal(p, before[name]) for name, p in network.named_parameters())
    with pytest.raises(ValueError, match="empty mapping"):
        batch_size({})
    assert batch_size(x) == 4 and batch_size(x["input_ids"]) == 4


def test_pretrain_then_fine_tune_lora_through_fg_cli(idx_root, tmp_path, capsys):
    """configs/vit_pretrain.yaml writes a checkpoint; configs/vit_finetune_lora_multi_direction.yaml starts from it
    (finetune.pretrained), trains LoRA adapters on the digits and leaves the pretrained weights as they were; a
    checkpoint that does not fit is refused in one line, before any run folder is made."""
    pytest.importorskip("peft")
    pytest.importorskip("sklearn")
    from fg_lightning.cli import main as fg_cli

    configs = os.path.join(os.path.dirname(__file__), "..", "configs")
    small = ["--trainer.enable_progress_bar", "false", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
             "--trainer.log_every_n_steps", "1"]
    pretrain = tmp_path / "pretrain"
    fg_cli(["fit", "--config", os.path.join(configs, "vit_pretrain.yaml"), "--data.root", idx_root,
            "--data.download", "false", "--data.batch_size", "8", "--data.val_size", "16",
            "--trainer.logger.init_args.save_dir", str(pretrain), *small])
    checkpoint = pretrain / "vit_pretrain" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    finetune = tmp_path / "finetune"
    config = os.path.join(configs, "vit_finetune_lora_multi_direction.yaml")
    argv = ["fit", "--config", config, "--model.network.init_args.model.init_args.checkpoint", str(checkpoint),
            "--data.init_args.per_class", "5", "--trainer.logger.init_args.save_dir", str(finetune), *small]
    fg_cli(argv)
    tuned = torch.load(finetune / "vit_finetune_lora_multi_direction" / "version_0" / "checkpoints" / "last.ckpt",
                       weights_only=False)["state_dict"]
    pretrained_state = torch.load(checkpoint, weights_only=False)["state_dict"]
    base = "network.module.model.base_model.model."
    weight = "encoder.layers.encoder_layer_0.mlp.0.base_layer.weight"
    assert torch.equal(tuned[base + weight], pretrained_state["network.module." + weight.replace("base_layer.", "")])
    assert any("lora_B" in key and tuned[key].abs().sum() > 0 for key in tuned)  # the adapters moved

    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"network.module.heads.head.weight": torch.zeros(3, 3)}}, other)
    argv[argv.index(str(checkpoint))] = str(other)
    argv[argv.index(str(finetune))] = str(tmp_path / "refused")
    with pytest.raises(SystemExit) as exit_info:
        fg_cli(argv)
    assert exit_info.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not fit VisionTransformer" in lines[0], lines
    assert not (tmp_path / "refused").exists()


FINETUNE_CONFIGS = sorted(name[:-5] for name in os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs"))
                          if name.startswith("vit_finetune_"))


@pytest.mark.parametrize("name", FINETUNE_CONFIGS)
def test_every_fine_tuning_config_trains_from_a_checkpoint(name, tmp_path):
    """Each configs/vit_finetune_*.yaml runs through fg-cli from a pretrained ViT's checkpoint: the head starts new
    (zero, `skip`), a trained weight moves, a frozen one (LoRA's base) stays bit for bit."""
    pytest.importorskip("peft")
    pytest.importorskip("sklearn")
    from fg_lightning.cli import main as fg_cli

    torch.manual_seed(0)
    source = ViT()
    nn.init.normal_(source.heads.head.weight)  # a pretrained head, not torchvision's zeros
    checkpoint = tmp_path / "pretrained.ckpt"
    torch.save({"state_dict": {f"network.module.{k}": v for k, v in source.state_dict().items()}}, checkpoint)
    lora_config = "lora" in name
    key = "model.network.init_args." + ("model.init_args." if lora_config else "") + "checkpoint"
    fg_cli(["fit", "--config", os.path.join(os.path.dirname(__file__), "..", "configs", name + ".yaml"),
            f"--{key}", str(checkpoint), "--data.init_args.per_class", "5", "--trainer.max_steps", "3",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    tuned = torch.load(tmp_path / "runs" / name / "version_0" / "checkpoints" / "last.ckpt",
                       weights_only=False)["state_dict"]
    prefix = "network.module.model.base_model.model." if lora_config else "network.module."
    mlp = "encoder.layers.encoder_layer_0.mlp.0." + ("base_layer." if lora_config else "") + "weight"
    pretrained_mlp = source.state_dict()["encoder.layers.encoder_layer_0.mlp.0.weight"]
    assert torch.equal(tuned[prefix + mlp], pretrained_mlp) == lora_config  # frozen under LoRA, trained otherwise
    if lora_config:
        assert any("lora_B" in k and tuned[k].abs().sum() > 0 for k in tuned)  # the adapters moved
    head = [k for k in tuned if k.endswith(("heads.head.weight", "heads.head.modules_to_save.default.weight"))]
    assert head and all(tuned[k].abs().sum() > 0 for k in head)  # trained
    # from zero (skip), not from the pretrained head: three small steps leave it far shorter than that head
    assert all(tuned[k].norm() < 0.5 * source.heads.head.weight.norm() for k in head)


def test_a_timm_model_fine_tunes_through_fg_cli(tmp_path):
    """The docs' timm config (docs/finetune.md: timm.create_model as the model's class_path, its **kwargs as
    dict_kwargs), run as written but for what needs a download or a GPU: pretrained=False, a 28x28 single-channel
    configuration, the digits in place of the user's data module; MeZO on its LoRA adapters for 2 steps."""
    pytest.importorskip("timm")
    pytest.importorskip("peft")
    pytest.importorskip("sklearn")
    import yaml

    from fg_lightning.cli import main as fg_cli

    page = open(os.path.join(os.path.dirname(__file__), "..", "docs", "finetune.md")).read()
    [documented] = [b for b in re.findall(r"^```yaml\n(.*?)^```", page, flags=re.S | re.M) if "timm.create_model" in b]
    settings = yaml.safe_load(documented)
    timm_model = settings["model"]["network"]["init_args"]["model"]
    assert timm_model["class_path"] == "timm.create_model" and timm_model["init_args"]["pretrained"] is True
    timm_model["init_args"].update(model_name="vit_tiny_patch16_224", pretrained=False)
    timm_model["dict_kwargs"].update(img_size=28, patch_size=7, in_chans=1, depth=2)
    settings.update(seed_everything=0, data={"class_path": "fg_lightning.data.DigitsDataModule",
                                             "init_args": {"per_class": 5, "batch_size": 10}},
                    trainer={"max_steps": 2, "logger": False, "enable_progress_bar": False,
                             "default_root_dir": str(tmp_path)})
    settings["model"].update(estimator={"class_path": "fg_lightning.estimators.ZerothOrder"},
                             optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.001}})
    config = tmp_path / "timm.yaml"
    config.write_text(yaml.safe_dump(settings))
    fg_cli(["fit", "--config", str(config)])
    saved = torch.load(next(tmp_path.glob("checkpoints/*.ckpt")), weights_only=False)["state_dict"]
    assert any("lora_B" in k and saved[k].abs().sum() > 0 for k in saved)
