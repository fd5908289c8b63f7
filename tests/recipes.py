"""Models, parameter-grouping rules and training loops copied from public training code, for the mapping tests.

Every model here is full of tensors that share a shape, so an optimizer entry paired with the
wrong parameter still fits the shapes: only the real order (or the content) tells them apart.
The grouping functions reproduce the logic of the public code they are named after (copied, so
that the tests depend on neither timm nor torchvision).
"""
from __future__ import annotations

import copy
import re

import torch
from torch import nn

W = 32  # every Linear is W x W, every bias W: all interchangeable by shape (and big enough to read content from)


def lin(bias: bool = True):
    return nn.Linear(W, W, bias=bias)


class HeadBackbone(nn.Module):
    """A backbone and a head whose layers all have the same shapes."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(lin(), nn.Tanh(), lin())
        self.head = nn.Sequential(lin(), nn.Tanh(), lin())

    def forward(self, x):
        return self.head(self.backbone(x))


class Stack(nn.Module):
    """An input layer, n identical residual blocks and an output layer (a transformer's skeleton)."""

    def __init__(self, n: int = 4, bias: bool = True):
        super().__init__()
        self.embed = lin(bias)
        self.layers = nn.ModuleList(lin(bias) for _ in range(n))
        self.head = lin(bias)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return self.head(x)


class Net(nn.Module):
    """A generator, a discriminator, a tower: two layers named fc and out."""

    def __init__(self):
        super().__init__()
        self.fc = lin()
        self.out = lin()

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)))


def mse_to_zero(model, batch):
    return model(batch).pow(2).mean()


def random_batch(n: int = 6):
    return torch.randn(n, W)


def fit(model, opt, steps: int = 4, loss=mse_to_zero, batch=random_batch, seed: int = 0):
    """The ordinary loop: zero_grad, backward, step. Leaves the optimizer in train mode (params hold y)."""
    torch.manual_seed(seed)
    if hasattr(opt, "train"):
        opt.train()
    model.train()
    for _ in range(steps):
        b = batch()
        opt.zero_grad()
        loss(model, b).backward()
        opt.step()
    return opt


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def eval_x(modules, opts, rebuild=None) -> dict[str, torch.Tensor]:
    """x as the optimizers' own eval() gives it, on deep copies (the originals stay in train mode).

    `modules` is one module or a dict {prefix: module}; the result is that module's state dict
    (or every module's, names prefixed with `prefix.`). All modules and optimizers are deep-copied
    together, so the copied optimizers point at the copied parameters (and at copies of any
    parameter that lives outside the modules). `rebuild(copied_modules) -> optimizer` is for
    optimizers that do not deep-copy faithfully (heavyball): built on the copies, then given the
    original's state_dict.
    """
    single = isinstance(modules, nn.Module)
    mods = {"": modules} if single else dict(modules)
    opts = list(opts) if isinstance(opts, (list, tuple)) else [opts]
    if rebuild is not None:
        mods2 = copy.deepcopy(mods)
        opt2 = rebuild(mods2[""] if single else mods2)
        opt2.load_state_dict(opts[0].state_dict())
        opts2 = [opt2]
    else:
        mods2, opts2 = copy.deepcopy((mods, opts))
    for o in opts2:
        o.eval()
    out = {}
    for prefix, m in mods2.items():
        for k, v in m.state_dict().items():
            out[f"{prefix}.{k}" if prefix else k] = v.detach().clone()
    return out


def changed(x: dict, y: dict) -> set[str]:
    """Names whose x differs from y: the tensors the optimizer really moved."""
    return {k for k in x if k in y and not torch.equal(x[k], y[k])}


def tied_names(module: nn.Module) -> set[str]:
    """State-dict names that share storage with an earlier name (tied weights)."""
    seen, tied = set(), set()
    for k, v in module.state_dict(keep_vars=True).items():
        if not v.is_floating_point() or v.numel() == 0:
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            tied.add(k)
        seen.add(key)
    return tied


# ---- grouping rules from public training code --------------------------------------------------

def nanogpt_groups(model: nn.Module, weight_decay: float = 0.1):
    """nanoGPT `GPT.configure_optimizers`: every 2D+ tensor decays, biases and norms do not."""
    param_dict = {pn: p for pn, p in model.named_parameters()}
    param_dict = {pn: p for pn, p in param_dict.items() if p.requires_grad}
    decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
    nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
    return [
        {"params": decay_params, "weight_decay": weight_decay},
        {"params": nodecay_params, "weight_decay": 0.0},
    ]


def timm_param_groups_weight_decay(model: nn.Module, weight_decay: float = 1e-5, no_weight_decay_list=()):
    """timm.optim.param_groups_weight_decay: 1D tensors and biases without decay (that group first)."""
    no_weight_decay_list = set(no_weight_decay_list)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in no_weight_decay_list:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def torchvision_set_weight_decay(model: nn.Module, weight_decay: float = 1e-4, norm_weight_decay: float = 0.0,
                                 custom_keys_weight_decay=(("bias", 0.0),)):
    """torchvision references/classification/utils.py `set_weight_decay` (as train.py calls it with
    --norm-weight-decay and --bias-weight-decay): groups other / norm / bias, filled by a walk
    over the module tree, each module's own parameters before its children's."""
    norm_classes = (
        nn.modules.batchnorm._BatchNorm,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.modules.instancenorm._InstanceNorm,
        nn.LocalResponseNorm,
    )
    params = {"other": [], "norm": []}
    params_weight_decay = {"other": weight_decay, "norm": norm_weight_decay}
    custom_keys = []
    if custom_keys_weight_decay is not None:
        for key, key_weight_decay in custom_keys_weight_decay:
            params[key] = []
            params_weight_decay[key] = key_weight_decay
            custom_keys.append(key)

    def _add_params(module, prefix=""):
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_custom_key = False
            for key in custom_keys:
                target_name = f"{prefix}.{name}" if prefix != "" and "." in key else name
                if key == target_name:
                    params[key].append(p)
                    is_custom_key = True
                    break
            if not is_custom_key:
                if norm_weight_decay is not None and isinstance(module, norm_classes):
                    params["norm"].append(p)
                else:
                    params["other"].append(p)
        for child_name, child_module in module.named_children():
            child_prefix = f"{prefix}.{child_name}" if prefix != "" else child_name
            _add_params(child_module, prefix=child_prefix)

    _add_params(model)
    param_groups = []
    for key in params:
        if len(params[key]) > 0:
            param_groups.append({"params": params[key], "weight_decay": params_weight_decay[key]})
    return param_groups


def mingpt_groups(model: nn.Module, weight_decay: float = 0.1):
    """minGPT `GPT.configure_optimizers` (and its many forks): decay / no-decay sets of names by module type,
    each group listed in *sorted name* order ('h.10' before 'h.2'). transformers' Conv1D counts as Linear."""
    from transformers.pytorch_utils import Conv1D

    whitelist_weight_modules = (nn.Linear, Conv1D)
    blacklist_weight_modules = (nn.LayerNorm, nn.Embedding)
    decay, no_decay = set(), set()
    for mn, m in model.named_modules():
        for pn, p in m.named_parameters():
            fpn = "%s.%s" % (mn, pn) if mn else pn
            if pn.endswith("bias"):
                no_decay.add(fpn)
            elif pn.endswith("weight") and isinstance(m, whitelist_weight_modules):
                decay.add(fpn)
            elif pn.endswith("weight") and isinstance(m, blacklist_weight_modules):
                no_decay.add(fpn)
    param_dict = {pn: p for pn, p in model.named_parameters()}
    decay &= set(param_dict)  # the tied lm_head.weight (nanoGPT's early `decay.remove('lm_head.weight')`)
    assert not decay & no_decay and decay | no_decay == set(param_dict)
    return [
        {"params": [param_dict[pn] for pn in sorted(list(decay))], "weight_decay": weight_decay},
        {"params": [param_dict[pn] for pn in sorted(list(no_decay))], "weight_decay": 0.0},
    ]


def hf_trainer_groups(model: nn.Module, weight_decay: float = 0.1):
    """transformers Trainer.create_optimizer's two groups, from Trainer.get_decay_parameter_names."""
    from transformers import Trainer

    decay_parameters = Trainer.get_decay_parameter_names(None, model)
    return [
        {"params": [p for n, p in model.named_parameters() if n in decay_parameters and p.requires_grad],
         "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decay_parameters and p.requires_grad],
         "weight_decay": 0.0},
    ]


def layerwise_lr_decay_groups(model: Stack, lr: float = 0.02, decay: float = 0.75):
    """Layer-wise lr decay (BEiT / ELECTRA fine-tuning): one group per depth, deepest first."""
    blocks = [model.head, *reversed(model.layers), model.embed]
    return [{"params": list(b.parameters()), "lr": lr * decay**i} for i, b in enumerate(blocks)]


def llrd_groups_by_name(model: nn.Module, n_layers: int, lr: float = 0.01, decay: float = 0.8):
    """The layer-wise lr decay found in BERT/DeBERTa fine-tuning notebooks, by parameter name: embeddings
    depth 0, block i depth i+1, everything else (final norm, pooler, heads) on top; deepest group first."""

    def depth(name):
        m = re.search(r"\.layers?\.(\d+)\.", name)
        if m:
            return int(m.group(1)) + 1
        return 0 if "embed" in name else n_layers + 1

    by_depth: dict[int, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_depth.setdefault(depth(name), []).append(p)
    top = n_layers + 1
    return [{"params": by_depth[d], "lr": lr * decay ** (top - d)} for d in sorted(by_depth, reverse=True)]


# ---- transformers models from tiny configs -------------------------------------------------------

def tiny_hf(kind: str):
    """(model, loss(model, batch), batch()) for a tiny transformers model trained with its own loss."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    elif kind == "gpt2-12":  # twelve blocks, so that sorted names put h.10 and h.11 before h.2
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=12, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    elif kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                   num_hidden_layers=2, num_attention_heads=2,
                                                   num_key_value_heads=1, max_position_embeddings=32))
    elif kind == "bert":
        model = tf.BertForMaskedLM(tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=32,
                                                 max_position_embeddings=32))
    elif kind == "bert-cls":
        model = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                               num_attention_heads=2, intermediate_size=32,
                                                               max_position_embeddings=32, num_labels=3))
    elif kind == "t5":
        model = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                          num_heads=2, decoder_start_token_id=0, pad_token_id=0))
    elif kind == "resnet":
        model = tf.ResNetForImageClassification(tf.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 8],
                                                                depths=[1, 1], layer_type="basic", num_labels=3))
    elif kind == "vitmodel":  # the bare ViTModel, with its pooler
        model = tf.ViTModel(tf.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=32))
    elif kind == "vit":
        model = tf.ViTForImageClassification(tf.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                                          num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=32, num_labels=3))
    else:
        raise ValueError(kind)

    if kind == "vitmodel":
        def batch():
            return {"pixel_values": torch.randn(4, 3, 8, 8)}

        def loss(m, b):  # no loss of its own: regress the pooled and token features to zero
            out = m(**b)
            return out.pooler_output.pow(2).mean() + out.last_hidden_state.pow(2).mean()

        return model, loss, batch
    if kind in ("resnet", "vit"):
        size = 16 if kind == "resnet" else 8

        def batch():
            return {"pixel_values": torch.randn(4, 3, size, size), "labels": torch.randint(0, 3, (4,))}
    elif kind == "bert-cls":
        def batch():
            return {"input_ids": torch.randint(2, 64, (4, 8)), "labels": torch.randint(0, 3, (4,))}
    else:
        def batch():
            ids = torch.randint(2, 64, (4, 8))
            return {"input_ids": ids, "labels": ids}  # noqa: E731

    def loss(m, b):
        return m(**b).loss

    return model, loss, batch
