"""Try to break the parameter mapping (issue #10) with the recipes people really train with.

An optimizer's state_dict keys its state by position; sfckpt must work out which model tensor
each entry belongs to. Every model below has many tensors of one shape, so a wrong pairing fits
the shapes and only the real order, or the content, tells it apart. Each test trains with the
real optimizer, saves the checkpoint the way the public code does, converts it with the CLI and
compares with the optimizer's own eval() (never hand-written numbers). Two contracts:

- `assert_converts`: exit 0 and every tensor bit-identical to eval()'s x. Used where the issue
  says the setup must convert, and where the file determines x because the interchangeable
  tensors started from different random initialisations (content tells them apart); those are
  marked "content decides".
- `assert_refused`: exit 2 with one `error:` line giving the reason, nothing written: what sfckpt
  does today where the interchangeable tensors leave a doubt. Never exit 0 with a wrong tensor; a
  setup that converts today is asserted to convert.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import schedulefree
import torch
from torch import nn

import recipes
from conftest import assert_equal_tensors, assert_refused, read
from recipes import HeadBackbone, Net, Stack, eval_x, fit, lin, snapshot


# ---- contracts ---------------------------------------------------------------------------------

def assert_converts(result, out, expected, tied=()):
    """Exit 0 and every tensor equal to eval()'s x; only tied duplicates may be left out."""
    assert result.exit_code == 0, f"exit {result.exit_code} where x is determined: {result.stderr}"
    got = read(out)
    missing = set(expected) - set(got)
    assert missing <= set(tied), f"tensors missing from the output: {sorted(missing - set(tied))}"
    assert_equal_tensors(got, {k: v for k, v in expected.items() if k in got})


def assert_trained(expected, y, names):
    """Guard on the test itself: these tensors really differ between y and x."""
    moved = recipes.changed(expected, y)
    assert set(names) <= moved, f"eval() did not move {sorted(set(names) - moved)}: the test would prove nothing"


def save_and_convert(run, tmp_path, obj, *args, out_name="x.safetensors"):
    ckpt = tmp_path / "ckpt.pt"
    torch.save(obj, ckpt)
    out = tmp_path / out_name
    return run("convert", ckpt, out, *args), out


def sfadamw(groups, **kw):
    kw.setdefault("lr", 0.02)
    kw.setdefault("betas", (0.9, 0.999))
    return schedulefree.AdamWScheduleFree(groups, **kw)


# ---- 1. parameter groups in an order other than the model's ---------------------------------------

def _head_first(model):
    return [{"params": model.head.parameters(), "lr": 0.01}, {"params": model.backbone.parameters()}]


def _sorted_by_name(model):
    return [p for _, p in sorted(model.named_parameters())]  # 'layers.10' < 'layers.2'


def _reversed(model):
    return reversed(list(model.parameters()))


GROUP_ORDERS = {
    # fine-tuning recipes: a new head with its own lr listed first
    "head-first": (HeadBackbone, _head_first),
    # BEiT/ELECTRA layer-wise lr decay over identical blocks, deepest first
    "layerwise-lr-decay": (lambda: Stack(4), recipes.layerwise_lr_decay_groups),
    # parameters collected from a name-sorted dict (a 12-layer stack: layers.10 before layers.2);
    # bias-free like LLaMA, so every position fits the shapes, and with biases (bias sorts before weight)
    "sorted-by-name": (lambda: Stack(12, bias=False), _sorted_by_name),
    "sorted-by-name-biased": (lambda: Stack(12), _sorted_by_name),
    "reversed": (lambda: Stack(3, bias=False), _reversed),
    "reversed-biased": (lambda: Stack(3), _reversed),
}


@pytest.mark.parametrize("recipe", GROUP_ORDERS)
def test_groups_out_of_model_order(recipe, run, tmp_path):
    """Optimizer groups/params handed over in head-first, LLRD, name-sorted or reversed order (fine-tuning scripts)."""
    make_model, groups = GROUP_ORDERS[recipe]
    torch.manual_seed(0)
    model = make_model()
    opt = fit(model, sfadamw(groups(model)))
    y, expected = snapshot(model), eval_x(model, opt)
    assert_trained(expected, y, expected)
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    # content decides: every same-shape tensor started from its own random initialisation
    assert_converts(result, out, expected)


def test_heavyball_groups_reversed(run, tmp_path):
    """heavyball SFAdamW with the head's group before the backbone's (fine-tuning with heavyball)."""
    torch.manual_seed(0)
    model = HeadBackbone()

    def build(m):
        import heavyball
        import heavyball.utils

        heavyball.utils.compile_mode = None  # as trainers._heavyball: no torch.compile in tests

        return heavyball.SFAdamW([{"params": list(m.head.parameters())}, {"params": list(m.backbone.parameters())}],
                                 lr=0.02, betas=(0.85, 0.99))

    opt = fit(model, build(model))
    y, expected = snapshot(model), eval_x(model, opt, rebuild=build)
    assert_trained(expected, y, expected)
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected)  # content decides


def _lightning_fit(module, tmp_path, epochs=1):
    """A real lightning.Trainer on CPU with ModelCheckpoint(save_last=True); 3 batches per epoch."""
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, recipes.W)), batch_size=4)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, data)
    return trainer, tmp_path / "ckpts" / "last.ckpt"


def test_lightning_configure_optimizers_head_first(run, tmp_path):
    """A LightningModule whose configure_optimizers lists the head's group before the backbone's."""
    L = pytest.importorskip("lightning")

    class FineTune(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = HeadBackbone()

        def training_step(self, batch, _):
            return self.model(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return sfadamw(_head_first(self.model))

        def on_train_epoch_start(self):
            self.optimizers().optimizer.train()

    torch.manual_seed(0)
    module = FineTune()
    trainer, ckpt = _lightning_fit(module, tmp_path)
    y, expected = snapshot(module.model), eval_x(module.model, trainer.optimizers[0])
    assert_trained(expected, y, expected)
    out = tmp_path / "x.safetensors"
    result = run("convert", ckpt, out, "--strip-prefix", "model.")
    assert_converts(result, out, expected)  # content decides


# ---- 2. progressive unfreezing --------------------------------------------------------------------

@pytest.mark.parametrize("train_again", [True, False], ids=["train-called", "train-forgotten"])
def test_progressive_unfreezing_add_param_group(train_again, run, tmp_path):
    """ULMFiT-style gradual unfreezing: train the head, then opt.add_param_group(backbone) and go on."""
    torch.manual_seed(0)
    model = HeadBackbone()
    model.backbone.requires_grad_(False)
    opt = sfadamw(model.head.parameters())
    torch.manual_seed(1)
    opt.train()
    for _ in range(2):
        opt.zero_grad()
        model(recipes.random_batch()).pow(2).mean().backward()
        opt.step()
    model.backbone.requires_grad_(True)
    opt.add_param_group({"params": model.backbone.parameters(), "lr": 0.005})
    # the new group starts with train_mode=False; the library wants train() again. Forgotten, step() still
    # trains it (only group 0's flag is checked) and eval() leaves it alone: then its x is what it holds
    if train_again:
        opt.train()
    assert opt.param_groups[1]["train_mode"] is train_again
    for _ in range(3):
        opt.zero_grad()
        model(recipes.random_batch()).pow(2).mean().backward()
        opt.step()
    y, expected = snapshot(model), eval_x(model, opt)
    assert_trained(expected, y, expected if train_again else [k for k in expected if k.startswith("head.")])
    if not train_again:
        assert not recipes.changed(expected, {k: v for k, v in y.items() if k.startswith("backbone.")})
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected)  # content decides


# ---- 3. groups without state -----------------------------------------------------------------------

class MultiTask(nn.Module):
    """A shared encoder and three task heads; only task1 is trained so far (curriculum / multi-task)."""

    def __init__(self):
        super().__init__()
        self.encoder = lin()
        self.task1 = lin()
        self.task2 = lin()
        self.task3 = lin()

    def forward(self, x):
        return self.task1(torch.tanh(self.encoder(x)))


@pytest.mark.parametrize("order", [("encoder", "task2", "task1", "task3"), ("task2", "encoder", "task1")],
                         ids=["between-and-after", "first"])
def test_group_without_state_between_trained_groups(order, run, tmp_path):
    """One group per task, some heads not used yet (no gradient, no state) listed between/after trained ones."""
    torch.manual_seed(0)
    model = MultiTask()
    opt = fit(model, sfadamw([{"params": getattr(model, name).parameters()} for name in order]))
    assert sum("z" in s for s in opt.state.values()) == 4  # encoder and task1 only
    y, expected = snapshot(model), eval_x(model, opt)
    assert_trained(expected, y, ["encoder.weight", "encoder.bias", "task1.weight", "task1.bias"])
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected)  # content decides; stateless entries keep y, which is their x


# ---- 4. counts that coincide ------------------------------------------------------------------------

class FrozenStemEncoder(nn.Module):
    """A frozen pretrained stem before (or after) a trainable encoder."""

    def __init__(self, stem_first: bool = True):
        super().__init__()
        if stem_first:
            self.stem = lin()
            self.encoder = nn.Sequential(lin(), nn.Tanh(), lin())
        else:
            self.encoder = nn.Sequential(lin(), nn.Tanh(), lin())
            self.stem = lin()
        self.stem.requires_grad_(False)
        self.stem_first = stem_first

    def forward(self, x):
        if self.stem_first:
            return self.encoder(torch.tanh(self.stem(x)))
        return self.stem(torch.tanh(self.encoder(x)))


COINCIDING = {
    # SimCLR/BYOL: the loss module owns a projector; optimizer = model params + projector params
    "projector-last": (True, False),
    # the same with the projector listed first and the frozen layer at the end of the model
    "projector-first-stem-after": (False, True),
    # ArcFace/CosFace: the margin loss owns the class-centre matrix; the model keeps its old frozen classifier
    "arcface-centres-stem-after": (False, False),
}


@pytest.mark.parametrize("recipe", COINCIDING)
def test_loss_owned_parameters_with_as_many_frozen_tensors(recipe, run, tmp_path):
    """The loss owns trained parameters (SimCLR projector, ArcFace centres) while the model has as many frozen same-shape tensors."""
    stem_first, loss_params_first = COINCIDING[recipe]
    torch.manual_seed(0)
    model = FrozenStemEncoder(stem_first)
    outside = lin()  # lives in the loss, not in the model's state dict; same shapes as the frozen stem

    def loss(m, b):
        return outside(nn.functional.normalize(m(b))).pow(2).mean()

    inside = [p for p in model.parameters() if p.requires_grad]
    params = list(outside.parameters()) + inside if loss_params_first else inside + list(outside.parameters())
    opt = fit(model, sfadamw(params), loss=loss)
    y, expected = snapshot(model), eval_x(model, opt)
    assert sum(1 for _ in model.parameters()) == sum("z" in s for s in opt.state.values())  # the counts coincide
    assert recipes.changed(expected, y) == {k for k in expected if k.startswith("encoder.")}
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    # the frozen stem's x is its y; it must never be lerped towards the loss's parameters' z
    assert_refused(result, out, "fits no tensor of these weights", "content rules out 'stem.weight'")


# ---- 5. saved param_names that name other tensors -------------------------------------------------

@pytest.mark.parametrize("how", ["named_parameters", "param_names-group"])
def test_param_names_relative_to_a_submodule(how, run, tmp_path):
    """Optimizer built from model[2].named_parameters(): names '0.weight'… that are the model's frozen layers."""
    torch.manual_seed(0)
    model = nn.Sequential(lin(), lin(), nn.Sequential(lin(), lin()))  # every saved name exists in the model
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    adapter = model[2]
    if how == "named_parameters":
        opt = sfadamw(adapter.named_parameters())  # torch >= 2.6 saves param_names
    else:
        names, params = zip(*adapter.named_parameters())
        opt = sfadamw([{"params": list(params), "param_names": list(names)}])
    fit(model, opt)
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    y, expected = snapshot(model), eval_x(model, opt)
    assert recipes.changed(expected, y) == {"2.0.weight", "2.0.bias", "2.1.weight", "2.1.bias"}
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected)


# ---- 6. several optimizers, several models ------------------------------------------------------

def test_second_optimizer_for_the_head(run, tmp_path):
    """{"model", "optimizer", "optimizer_head"}: the backbone and the head trained by two optimizers, different β."""
    torch.manual_seed(0)
    model = HeadBackbone()
    opt = sfadamw(model.backbone.parameters(), betas=(0.9, 0.999))
    opt_head = sfadamw(model.head.parameters(), lr=0.01, betas=(0.95, 0.999))
    torch.manual_seed(1)
    opt.train(), opt_head.train()
    for _ in range(4):
        opt.zero_grad(), opt_head.zero_grad()
        model(recipes.random_batch()).pow(2).mean().backward()
        opt.step(), opt_head.step()
    y, expected = snapshot(model), eval_x(model, [opt, opt_head])
    assert_trained(expected, y, expected)
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                   "optimizer_head": opt_head.state_dict()})
    assert_converts(result, out, expected)  # each tensor converted with the optimizer that trains it


def _train_gan(G, D, opt_g, opt_d, steps=4):
    """The DCGAN example's loop (least-squares loss): a D step on real and fake, then a G step."""
    torch.manual_seed(1)
    opt_g.train(), opt_d.train()
    for _ in range(steps):
        real, noise = recipes.random_batch(), recipes.random_batch()
        fake = G(noise)
        opt_d.zero_grad()
        ((D(real) - 1).pow(2).mean() + D(fake.detach()).pow(2).mean()).backward()
        opt_d.step()
        opt_g.zero_grad()
        (D(fake) - 1).pow(2).mean().backward()
        opt_g.step()


def test_gan_dict_converts_every_model(run, tmp_path):
    """{"netG", "netD", "optimizerG", "optimizerD"} (pytorch/examples dcgan-style), G and D of the same shapes."""
    torch.manual_seed(0)
    G, D = Net(), Net()
    opt_g = sfadamw(G.parameters(), lr=0.02, betas=(0.5, 0.999))  # DCGAN's β1 = 0.5
    opt_d = sfadamw(D.parameters(), lr=0.01, betas=(0.9, 0.999))
    _train_gan(G, D, opt_g, opt_d)
    models = {"netG": G, "netD": D}
    y = {f"{p}.{k}": v for p, m in models.items() for k, v in snapshot(m).items()}
    expected = eval_x(models, [opt_g, opt_d])
    assert_trained(expected, y, expected)
    obj = {"netG": G.state_dict(), "netD": D.state_dict(), "optimizerG": opt_g.state_dict(),
           "optimizerD": opt_d.state_dict()}
    result, out = save_and_convert(run, tmp_path, obj)
    assert_converts(result, out, expected)  # every model, names prefixed with its key
    assert {k.split(".")[0] for k in read(out)} == {"netG", "netD"}
    for key, model, o in (("netG", G, opt_g), ("netD", D, opt_d)):
        result, out = save_and_convert(run, tmp_path, obj, "--model-key", key, out_name=f"{key}.safetensors")
        assert_converts(result, out, eval_x(model, o))  # the selected model alone, with its own names


def test_two_towers_model_key_picks_its_own_optimizer(run, tmp_path):
    """CLIP-style dual encoder saved as {"tower_a", "tower_b", "opt_a", "opt_b"}, converted with --model-key tower_b."""
    torch.manual_seed(0)
    a, b = Net(), Net()
    opt_a = sfadamw(a.parameters(), lr=0.02, betas=(0.9, 0.999))
    opt_b = sfadamw(b.parameters(), lr=0.01, betas=(0.95, 0.999))
    torch.manual_seed(1)
    opt_a.train(), opt_b.train()
    for _ in range(4):
        x1, x2 = recipes.random_batch(), recipes.random_batch()
        opt_a.zero_grad(), opt_b.zero_grad()
        ea, eb = a(x1), b(x1 + 0.1 * x2)
        (1 - nn.functional.cosine_similarity(ea, eb)).mean().backward()
        opt_a.step(), opt_b.step()
    y_b, expected_b = snapshot(b), eval_x(b, opt_b)
    assert_trained(expected_b, y_b, expected_b)
    obj = {"tower_a": a.state_dict(), "tower_b": b.state_dict(),
           "opt_a": opt_a.state_dict(), "opt_b": opt_b.state_dict()}
    result, out = save_and_convert(run, tmp_path, obj, "--model-key", "tower_b")
    assert_converts(result, out, expected_b)  # tower_b's x: opt_b's z and β, never opt_a's
    result, out = save_and_convert(run, tmp_path, obj, out_name="both.safetensors")
    assert_converts(result, out, eval_x({"tower_a": a, "tower_b": b}, [opt_a, opt_b]))


class TinyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(4, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.up = nn.Conv2d(4, 4, 3, padding=1)
        self.cond = nn.Linear(4, 4)

    def forward(self, x, c):
        h = torch.tanh(self.down(x)) + self.cond(c)[:, :, None, None]
        return self.up(torch.tanh(self.mid(h)))


class TinyTextEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 4)
        self.proj = nn.Linear(4, 4)
        self.final = nn.Linear(4, 4)

    def forward(self, ids):
        return self.final(torch.tanh(self.proj(self.embed(ids)))).mean(1)


def _train_unet_and_text_encoder():
    torch.manual_seed(0)
    unet, te = TinyUNet(), TinyTextEncoder()
    opt = sfadamw(itertools.chain(unet.parameters(), te.parameters()), lr=0.01)
    torch.manual_seed(1)
    opt.train()
    for _ in range(4):
        latents, noise, ids = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.randint(0, 16, (2, 5))
        opt.zero_grad()
        (unet(latents + noise, te(ids)) - noise).pow(2).mean().backward()
        opt.step()
    models = {"unet": unet, "text_encoder": te}
    y = {f"{p}.{k}": v for p, m in models.items() for k, v in snapshot(m).items()}
    expected = eval_x(models, opt)
    assert_trained(expected, y, expected)
    return {"unet": unet.state_dict(), "text_encoder": te.state_dict(), "optimizer": opt.state_dict()}, expected


def test_unet_and_text_encoder_one_optimizer(run, tmp_path):
    """diffusers train_dreambooth --train_text_encoder: one optimizer over chain(unet, text_encoder) parameters."""
    obj, expected = _train_unet_and_text_encoder()
    result, out = save_and_convert(run, tmp_path, obj)
    assert_converts(result, out, expected)  # both models, names prefixed with their keys


def test_unet_and_text_encoder_model_key_selects_one(run, tmp_path):
    """The same dreambooth checkpoint, shipping only the fine-tuned text encoder (--model-key text_encoder)."""
    obj, expected = _train_unet_and_text_encoder()
    result, out = save_and_convert(run, tmp_path, obj, "--model-key", "text_encoder")
    # the shared optimizer's first entries are the U-Net's, also in this file: x is determined
    assert_converts(result, out, {k.split(".", 1)[1]: v for k, v in expected.items() if k.startswith("text_encoder.")})


def test_lightning_gan_manual_optimization(run, tmp_path):
    """Lightning's GAN recipe: automatic_optimization = False, two optimizers → optimizer_states has two entries."""
    L = pytest.importorskip("lightning")

    class GAN(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.generator = Net()
            self.discriminator = Net()

        def training_step(self, batch, _):
            opt_g, opt_d = self.optimizers()
            real = batch[0]
            fake = self.generator(torch.randn_like(real))
            d_loss = (self.discriminator(real) - 1).pow(2).mean() + self.discriminator(fake.detach()).pow(2).mean()
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()
            g_loss = (self.discriminator(fake) - 1).pow(2).mean()
            opt_g.zero_grad()
            self.manual_backward(g_loss)
            opt_g.step()

        def configure_optimizers(self):
            return [sfadamw(self.generator.parameters(), lr=0.02, betas=(0.5, 0.999)),
                    sfadamw(self.discriminator.parameters(), lr=0.01, betas=(0.9, 0.999))]

        def on_train_epoch_start(self):
            for o in self.optimizers():
                o.optimizer.train()

    torch.manual_seed(0)
    module = GAN()
    trainer, ckpt = _lightning_fit(module, tmp_path)
    models = {"generator": module.generator, "discriminator": module.discriminator}
    y = snapshot(module)
    expected = eval_x(models, trainer.optimizers)
    assert_trained(expected, y, expected)
    assert len(torch.load(ckpt, weights_only=False)["optimizer_states"]) == 2
    out = tmp_path / "x.safetensors"
    result = run("convert", ckpt, out)
    assert_converts(result, out, expected)  # each half with its own optimizer


# ---- 7. weight-decay grouping: the groups interleave, each in model order -------------------------

WEIGHT_DECAY_RECIPES = {
    "nanogpt-gpt2": ("gpt2", recipes.nanogpt_groups),
    "timm-llama": ("llama", recipes.timm_param_groups_weight_decay),
    "torchvision-resnet": ("resnet", recipes.torchvision_set_weight_decay),
    "torchvision-vit": ("vit", recipes.torchvision_set_weight_decay),
    "torchvision-vitmodel": ("vitmodel", recipes.torchvision_set_weight_decay),
    "hf-trainer-rule-bert": ("bert", recipes.hf_trainer_groups),
    "hf-trainer-rule-t5": ("t5", recipes.hf_trainer_groups),
}


def _trained_names(model, opt):
    has_z = {id(p) for p, s in opt.state.items() if "z" in s}
    return [n for n, p in model.named_parameters() if id(p) in has_z]


@pytest.mark.parametrize("recipe", WEIGHT_DECAY_RECIPES)
def test_weight_decay_grouping(recipe, run, tmp_path):
    """nanoGPT / timm / torchvision / HF-Trainer decay-vs-no-decay groups on tiny transformers models, torch.save'd."""
    pytest.importorskip("transformers")
    kind, rule = WEIGHT_DECAY_RECIPES[recipe]
    model, loss, batch = recipes.tiny_hf(kind)
    groups = rule(model)
    if recipe.startswith("torchvision"):
        assert len(groups) == 3  # other / norm / bias
    opt = fit(model, sfadamw(groups, lr=0.01), loss=loss, batch=batch)
    y, expected = snapshot(model), eval_x(model, opt)
    trained = _trained_names(model, opt)
    assert len(trained) == sum(1 for p in model.parameters() if p.requires_grad)
    assert_trained(expected, y, trained)
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected, tied=recipes.tied_names(model))


# ---- 8. a real Hugging Face Trainer run with a frozen embedding ----------------------------------

def _hf_trainer_run(tmp_path, freeze=None, optimizer=None):
    """transformers.Trainer(optim="schedule_free_adamw") on a tiny tied Llama, 3 steps, saving checkpoint-3/.

    freeze(model) runs before the Trainer is built; optimizer(model) replaces the Trainer's own optimizer
    (Trainer(optimizers=(opt, scheduler))). Returns (checkpoint folder, eval()'s x, y as saved)."""
    tf = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                            tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(config)
    if freeze is not None:
        freeze(model)
    data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))} for _ in range(12)]
    # a fine-tuning lr: weights move little against their init scale (0.02), as in real checkpoints
    args = tf.TrainingArguments(output_dir=str(tmp_path / "run"), optim="schedule_free_adamw", learning_rate=1e-3,
                                weight_decay=0.1, per_device_train_batch_size=4, max_steps=3, save_steps=3,
                                report_to=[], use_cpu=True, logging_steps=100, lr_scheduler_type="constant")
    optimizers = (None, None)
    if optimizer is not None:
        opt = optimizer(model)
        optimizers = (opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    trainer = tf.Trainer(model=model, args=args, train_dataset=data, optimizers=optimizers)
    trainer.train()
    trainer.optimizer.eval()
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = tmp_path / "run" / "checkpoint-3"
    return ckpt, expected, load_file(str(ckpt / "model.safetensors"))


def _freeze_embedding(model):
    model.model.embed_tokens.requires_grad_(False)  # tied: the lm_head is frozen with it


def _freeze_first_layer(model):
    model.model.layers[0].requires_grad_(False)


@pytest.mark.slow
@pytest.mark.parametrize("freeze", [_freeze_embedding, _freeze_first_layer], ids=["embedding", "first-layer"])
def test_hf_trainer_folder_with_frozen_parameters(freeze, run, tmp_path):
    """Fine-tuning with transformers.Trainer(optim="schedule_free_adamw") after requires_grad_(False) on a part."""
    from transformers import AutoModelForCausalLM

    ckpt, expected, y = _hf_trainer_run(tmp_path, freeze)
    frozen = {k for k in y if "embed_tokens" in k} if freeze is _freeze_embedding else {
        k for k in y if k.startswith("model.layers.0.")}
    assert_trained(expected, y, set(y) - frozen)
    assert not recipes.changed(expected, {k: y[k] for k in frozen})  # frozen: x = y
    release = tmp_path / "release"
    result = run("convert", ckpt, release)
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(AutoModelForCausalLM.from_pretrained(str(release)).state_dict(), expected)


@pytest.mark.slow
def test_hf_trainer_with_custom_llrd_optimizer(run, tmp_path):
    """Trainer(optimizers=(AdamWScheduleFree(layer-wise lr decay groups), scheduler)): not the Trainer's own grouping."""
    ckpt, expected, y = _hf_trainer_run(
        tmp_path, optimizer=lambda m: sfadamw(recipes.llrd_groups_by_name(m, n_layers=2, lr=1e-3), lr=1e-3))
    assert_trained(expected, y, y)
    out = tmp_path / "x.safetensors"
    result = run("convert", ckpt, out)
    # the weights are told apart by content; the RMSNorm gains (all near 1) can follow the blocks' order
    assert_refused(result, out, "fits no tensor of these weights", "--param-order")


# ---- 9. torch.distributed.checkpoint with a hard-copied target network ---------------------------

class OnlineTarget(nn.Module):
    """DQN / BYOL: an online network and a frozen target network of the same architecture."""

    def __init__(self):
        super().__init__()
        self.online = Net()
        self.target = Net()
        self.target.requires_grad_(False)

    def forward(self, x):
        return self.online(x) - self.target(x).detach()


@pytest.mark.parametrize("container", ["dcp", "torch.save"])
def test_target_network_hard_copied_before_saving(container, run, tmp_path):
    """DQN's hard target update (target.load_state_dict(online.state_dict())) just before saving (dcp.save or torch.save)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    model = OnlineTarget()
    opt = fit(model, sfadamw(model.online.parameters()))
    model.target.load_state_dict(model.online.state_dict())  # byte-identical copies of y, not tracked by opt
    y, expected = snapshot(model), eval_x(model, opt)
    assert_trained(expected, y, [k for k in expected if k.startswith("online.")])
    assert recipes.changed(expected, y) == {k for k in expected if k.startswith("online.")}
    out = tmp_path / "x.safetensors"
    if container == "dcp":
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path / "dcp", no_dist=True)
        result = run("convert", tmp_path / "dcp", out)
        # the target's x is its y (never the online network's x); DCP cannot tell a copy from a tie
        assert_refused(result, out, "byte-identical", "--twins tied")
    else:
        result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
        # separate storages, so not tied; online and target hold the same bytes: refused until --twins says
        assert_refused(result, out, "content cannot tell them apart", "--param-order")


# ---- 10. more recipes from public training code -------------------------------------------------

class LoRALinear(nn.Module):
    """A frozen base layer with a LoRA adapter: A random, B zero-initialised (PEFT's default)."""

    def __init__(self, r: int = 4):
        super().__init__()
        self.base = lin()
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(recipes.W, r, bias=False)
        self.lora_B = nn.Linear(r, recipes.W, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))


class LoRAStack(nn.Module):
    def __init__(self, n: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(LoRALinear() for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_loraplus_groups_over_identical_adapters(run, tmp_path):
    """LoRA+ (create_loraplus_optimizer): all lora_A in one group, all zero-initialised lora_B in another with 16x lr."""
    torch.manual_seed(0)
    model = LoRAStack()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if "lora_A" in n], "lr": 0.01},
              {"params": [p for n, p in named if "lora_B" in n], "lr": 0.16}]
    opt = fit(model, sfadamw(groups))
    y, expected = snapshot(model), eval_x(model, opt)
    lora = [k for k in expected if "lora_" in k]
    assert_trained(expected, y, lora)
    assert recipes.changed(expected, y) == set(lora)
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    # each group in model order; the B matrices all start at zero, so within them only that order decides
    assert_converts(result, out, expected)


class WithEMA(nn.Module):
    """A network and its EMA (torch.optim.swa_utils.AveragedModel) as a submodule, as Lightning/DINO-style code keeps it."""

    def __init__(self, ema_first: bool):
        super().__init__()
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        net = Net()
        if ema_first:  # a teacher registered before the student
            self.ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9))
            self.net = net
        else:
            self.net = net
            self.ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        self.ema.requires_grad_(False)

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("ema_first", [False, True], ids=["ema-after", "ema-before"])
def test_ema_copy_as_frozen_submodule(ema_first, run, tmp_path):
    """Training with an in-model EMA: optimizer over model.net only; the EMA's tensors have the same shapes and lie close to y."""
    torch.manual_seed(0)
    model = WithEMA(ema_first)
    opt = sfadamw(model.net.parameters())
    torch.manual_seed(1)
    opt.train()
    for _ in range(4):
        opt.zero_grad()
        model(recipes.random_batch()).pow(2).mean().backward()
        opt.step()
        model.ema.update_parameters(model.net)
    y, expected = snapshot(model), eval_x(model, opt)
    assert recipes.changed(expected, y) == {k for k in expected if k.startswith("net.")}
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    # the EMA is an average of the y's, so content alone does not tell it from the network
    assert_refused(result, out, "content cannot tell them apart", "--param-order")


class MixedMLP(nn.Module):
    """Transformer-like MLP blocks: up (2W, W), down (W, 2W) and a square mixer (W, W) per block."""

    def __init__(self, n: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"mix": lin(), "up": nn.Linear(recipes.W, 2 * recipes.W),
                           "down": nn.Linear(2 * recipes.W, recipes.W)}) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = x + b["down"](torch.relu(b["up"](torch.tanh(b["mix"](x)))))
        return x


def test_params_sorted_by_size(run, tmp_path):
    """modded-nanogpt's Muon setup: params = sorted(params, key=lambda p: p.size(), reverse=True) in one group."""
    torch.manual_seed(0)
    model = MixedMLP()
    opt = fit(model, sfadamw(sorted(model.parameters(), key=lambda p: p.size(), reverse=True)))
    y, expected = snapshot(model), eval_x(model, opt)
    assert_trained(expected, y, expected)
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected)  # content decides


def test_all_parameters_split_by_requires_grad(run, tmp_path):
    """Every parameter handed over, frozen ones in a second lr=0 group, so unfreezing later needs no add_param_group."""
    torch.manual_seed(0)
    model = Stack(4)
    model.embed.requires_grad_(False)
    model.layers[0].requires_grad_(False)
    model.layers[2].requires_grad_(False)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]},
              {"params": [p for p in model.parameters() if not p.requires_grad], "lr": 0.0}]
    opt = fit(model, sfadamw(groups))
    y, expected = snapshot(model), eval_x(model, opt)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert recipes.changed(expected, y) == trainable
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected)  # content decides; frozen entries have no z and keep y


def test_depth_upscaled_layers_with_llrd(run, tmp_path):
    """SOLAR-style depth up-scaling (new layers copied from old ones), then fine-tuned with deepest-first LLRD groups."""
    torch.manual_seed(0)
    model = Stack(4)
    model.layers[2].load_state_dict(model.layers[0].state_dict())
    model.layers[3].load_state_dict(model.layers[1].state_dict())
    opt = fit(model, sfadamw(recipes.layerwise_lr_decay_groups(model)))
    y, expected = snapshot(model), eval_x(model, opt)
    assert_trained(expected, y, expected)
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    # copies started from the same bytes: content separates them only by 4 steps of training
    assert_refused(result, out, "content cannot tell them apart", "--param-order")


def test_bert_llrd_fine_tuning(run, tmp_path):
    """The BERT fine-tuning notebooks' layer-wise lr decay (classifier, layer.1, layer.0, embeddings) on BertForSequenceClassification."""
    pytest.importorskip("transformers")
    model, loss, batch = recipes.tiny_hf("bert-cls")
    opt = fit(model, sfadamw(recipes.llrd_groups_by_name(model, n_layers=2), lr=0.01), loss=loss, batch=batch)
    y, expected = snapshot(model), eval_x(model, opt)
    assert_trained(expected, y, _trained_names(model, opt))
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    # weights are told apart by content; LayerNorm gains (near 1) and zero-initialised biases are not
    assert_converts(result, out, expected, tied=recipes.tied_names(model))


@pytest.mark.slow
def test_mingpt_name_sorted_groups(run, tmp_path):
    """minGPT's configure_optimizers: decay/no-decay name sets, each group in sorted-name order, on a 12-block GPT-2."""
    pytest.importorskip("transformers")
    model, loss, batch = recipes.tiny_hf("gpt2-12")
    opt = fit(model, sfadamw(recipes.mingpt_groups(model), lr=0.01), loss=loss, batch=batch)
    y, expected = snapshot(model), eval_x(model, opt)
    assert_trained(expected, y, _trained_names(model, opt))
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    # the no-decay group holds every LayerNorm gain (near 1) and every zero-initialised bias, name-sorted
    # (h.0.attn.c_proj.bias, h.0.ln_1.bias, …, h.10.…): content barely tells them apart, order is not the model's
    assert_converts(result, out, expected, tied=recipes.tied_names(model))


def test_timm_checkpoint_with_state_dict_ema(run, tmp_path):
    """timm's CheckpointSaver layout: {"epoch", "arch", "state_dict", "optimizer", "version", "state_dict_ema"} (ModelEmaV2)."""
    torch.manual_seed(0)
    model = Stack(2)
    ema = copy.deepcopy(model).requires_grad_(False)  # timm ModelEmaV2: a deep copy, updated after each step
    opt = sfadamw(model.parameters())
    torch.manual_seed(1)
    opt.train()
    for _ in range(4):
        opt.zero_grad()
        model(recipes.random_batch()).pow(2).mean().backward()
        opt.step()
        with torch.no_grad():
            for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
                e.copy_(e * 0.9 + (1.0 - 0.9) * m)
    y, expected = snapshot(model), eval_x(model, opt)
    assert_trained(expected, y, expected)
    ema_sd = snapshot(ema)
    obj = {"epoch": 3, "arch": "stack", "state_dict": model.state_dict(), "optimizer": opt.state_dict(), "version": 2,
           "state_dict_ema": ema.state_dict()}
    result, out = save_and_convert(run, tmp_path, obj)
    if result.exit_code == 0 and any(k.startswith("state_dict_ema.") for k in read(out)):
        # every model converted: the EMA is trained by no optimizer, so it is written as it is
        both = {**{f"state_dict.{k}": v for k, v in expected.items()},
                **{f"state_dict_ema.{k}": v for k, v in ema_sd.items()}}
        assert_converts(result, out, both)
    else:
        assert_converts(result, out, expected)  # never the EMA lerped towards the optimizer's z


class Wrapped(nn.Module):
    """What DistributedDataParallel / DataParallel put around a model (under `module`), or torch.compile's
    OptimizedModule (under `_orig_mod`): the same names, without a process group or torch._dynamo's import."""

    def __init__(self, module, attr="module"):
        super().__init__()
        setattr(self, attr, module)
        self.attr = attr

    def forward(self, x):
        return getattr(self, self.attr)(x)


@pytest.mark.parametrize("wrap", ["ddp", "compile"])
def test_param_names_with_wrapper_prefix(wrap, run, tmp_path):
    """Optimizer built from ddp_model / torch.compile(model) named_parameters() ('module.…', '_orig_mod.…'), model saved unwrapped."""
    torch.manual_seed(0)
    model = HeadBackbone()
    wrapped = Wrapped(model, "module" if wrap == "ddp" else "_orig_mod")
    named = dict(wrapped.named_parameters())
    prefix = "module." if wrap == "ddp" else "_orig_mod."
    head = [(n, p) for n, p in named.items() if n.startswith(prefix + "head.")]
    backbone = [(n, p) for n, p in named.items() if n.startswith(prefix + "backbone.")]
    opt = fit(model, sfadamw([{"params": head, "lr": 0.01}, {"params": backbone}]))  # head first, as in fine-tuning
    assert opt.state_dict()["param_groups"][0]["param_names"][0] == prefix + "head.0.weight"
    y, expected = snapshot(model), eval_x(model, opt)
    assert_trained(expected, y, expected)
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    # the saved names are the model's names under one wrapper prefix: they determine x
    assert_converts(result, out, expected)


class GatedStack(nn.Module):
    """Flamingo-style tanh-gated blocks: each block's gate a zero-initialised (1,)-parameter."""

    def __init__(self, n: int = 12):
        super().__init__()
        self.layers = nn.ModuleList(lin() for _ in range(n))
        self.gates = nn.ParameterList(nn.Parameter(torch.zeros(1)) for _ in range(n))

    def forward(self, x):
        for layer, gate in zip(self.layers, self.gates):
            x = x + torch.tanh(gate) * torch.tanh(layer(x))
        return x


@pytest.mark.parametrize("order", ["model", "sorted-by-name"])
def test_zero_initialised_scalar_gates(order, run, tmp_path):
    """Zero-init (1,) gates (Flamingo, ReZero) with 12 blocks, handed over in model order or from a name-sorted dict."""
    torch.manual_seed(0)
    model = GatedStack()
    params = list(model.parameters()) if order == "model" else [p for _, p in sorted(model.named_parameters())]
    opt = fit(model, sfadamw(params, lr=0.05), steps=5)
    y, expected = snapshot(model), eval_x(model, opt)
    assert_trained(expected, y, [k for k in expected if k.startswith("gates.")])
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    if order == "model":
        assert_converts(result, out, expected)  # the gates follow the model order that the weights confirm
    else:
        # the weights show the order is not the model's; one-element gates carry no content, yet this converts
        assert_converts(result, out, expected)


class SharedLayers(nn.Module):
    """ALBERT / Universal Transformer: one block applied at every depth (the same module listed 3 times)."""

    def __init__(self):
        super().__init__()
        self.embed = lin()
        block = lin()
        self.layers = nn.ModuleList([block] * 3)
        self.head = lin()

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return self.head(x)


def test_cross_layer_sharing_head_first(run, tmp_path):
    """ALBERT-style shared block (state dict lists it at layers.0/1/2, one storage) with the head's group first."""
    torch.manual_seed(0)
    model = SharedLayers()
    opt = fit(model, sfadamw([{"params": model.head.parameters(), "lr": 0.01},
                              {"params": [p for n, p in model.named_parameters() if not n.startswith("head.")]}]))
    y, expected = snapshot(model), eval_x(model, opt)
    assert_trained(expected, y, expected)
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected, tied=recipes.tied_names(model))  # content decides


class Distillation(nn.Module):
    """A LightningModule-style distillation wrapper: the frozen teacher registered before the student."""

    def __init__(self, student_from_teacher: bool):
        super().__init__()
        self.teacher = HeadBackbone().requires_grad_(False)
        self.student = HeadBackbone()
        if student_from_teacher:  # DistilBERT: the student starts as a copy of the teacher's layers
            self.student.load_state_dict(self.teacher.state_dict())

    def forward(self, x):
        return self.student(x)


@pytest.mark.parametrize("student_from_teacher", [False, True], ids=["independent", "student-from-teacher"])
def test_distillation_frozen_teacher_first(student_from_teacher, run, tmp_path):
    """Knowledge distillation: optimizer over model.student only, the frozen teacher (same shapes) first in the state dict."""
    torch.manual_seed(0)
    model = Distillation(student_from_teacher)

    def loss(m, b):
        return (m(b) - m.teacher(b).detach()).pow(2).mean() + m(b).pow(2).mean()

    opt = fit(model, sfadamw(model.student.parameters()), loss=loss)
    y, expected = snapshot(model), eval_x(model, opt)
    assert recipes.changed(expected, y) == {k for k in expected if k.startswith("student.")}
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    if student_from_teacher:
        assert_refused(result, out, "content cannot tell them apart", "--param-order")  # four steps from the same bytes: a near tie
    else:
        assert_converts(result, out, expected)  # content decides: the teacher never moved, z did


def test_bfloat16_head_first_groups(run, tmp_path):
    """bf16 training (model.to(torch.bfloat16)) with the head's group first: content read at bf16 resolution."""
    torch.manual_seed(0)
    model = HeadBackbone().to(torch.bfloat16)

    def loss(m, b):
        return m(b.to(torch.bfloat16)).float().pow(2).mean()

    opt = fit(model, sfadamw(_head_first(model)), loss=loss)
    y, expected = snapshot(model), eval_x(model, opt)
    assert_trained(expected, y, [k for k in expected if k.endswith("weight")])
    result, out = save_and_convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected)  # content decides
