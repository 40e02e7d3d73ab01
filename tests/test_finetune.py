"""Fine-tuning pretrained torch models on the torch backend: a trained subset (names or patterns), PEFT LoRA adapters,
starting weights from a checkpoint, and transformers from torchvision, timm and Hugging Face built offline from small
configurations: every weight estimator exact on the parameters that train (the jvp along their basis is autograd's
gradient), activity perturbation unbiased or refused in one line; bad input refused in one line."""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch import nn

from fg_lightning.estimators import REGISTRY, Backprop
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


def _hf_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=8, max_position_embeddings=16, num_labels=3)
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 20, (4, 6), generator=generator), torch.randint(0, 3, (4,), generator=generator)
    return (transformers.BertForSequenceClassification(config).double(),
            ["classifier.*", "*.attention.self.query.*", "bert.pooler.*"], batch)


def _timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, in_chans=1,
                              num_classes=3, depth=1, embed_dim=8, num_heads=2)
    return model.double(), ["head.*", "blocks.0.attn.qkv.*"], images(size=8)


@pytest.mark.parametrize("make", [_hf_vit, _hf_bert, _timm_vit], ids=["hf_vit", "hf_bert", "timm_vit"])
def test_transformers_from_the_hubs_libraries_are_exact_offline(make):
    """Hugging Face models (a ModelOutput's logits through the backend's one adapter, token ids as input) and timm's
    ViT (fused attention, run on the math kernel), built from small configurations: the jvp along the trained
    subset's basis is autograd's gradient; every weight estimator and activity perturbation run."""
    model, trainable, (x, labels) = make()
    network = TorchNetwork(model, num_classes=3, trainable=trainable)
    assert basis_error(network, x, labels) < 1e-10
    for name in ("naive", "input_qr", "partition", "activity"):
        grads = REGISTRY[name].make(k=2).estimate(network, x, labels, 0).grads
        assert all(torch.isfinite(g).all() for g in grads.values())


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
