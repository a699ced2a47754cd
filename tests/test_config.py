"""One typed config: defaults < recipe < file < flags; bad values and files get clear errors."""

from __future__ import annotations

import re

import pytest

from cifarlab.config import load_run_config, resolve_config, save_config
from cifarlab.errors import ConfigError


def test_defaults_are_the_notebook():
    cfg = resolve_config()
    assert (cfg.recipe, cfg.model.name, cfg.optim.name, cfg.optim.lr, cfg.optim.rho, cfg.optim.eps) == (
        "keras-book", "keras-deep", "rmsprop", 1e-3, 0.9, 1e-7)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.data.val_split) == (128, 20, 0.2)
    from cifarlab.data.folder import TEST_SPLIT  # the loader's default, written twice (config imports no data code)

    assert cfg.data.test_split == TEST_SPLIT


def test_precedence_file_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 3\n  batch_size: 64\noptim:\n  lr: 0.01\n")
    cfg = resolve_config(file=f, overrides={"train": {"epochs": 5}})
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == (5, 64, 0.01)


def test_toml_and_recipe_from_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('recipe = "keras-book-augmented"\n[train]\nepochs = 2\n')
    cfg = resolve_config(file=f)
    assert cfg.recipe == "keras-book-augmented" and cfg.augment.preset == "keras" and cfg.train.epochs == 2


def test_roundtrip(tmp_path):
    cfg = resolve_config(overrides={"train": {"epochs": 4}, "augment": {"zoom_range": [0.9, 1.2]}})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_run_config(tmp_path / "config.yaml") == cfg
    cfg = resolve_config("resnet", overrides={"optim": {"milestones": [0.3, 0.6, 0.9]}})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_run_config(tmp_path / "config.yaml") == cfg and cfg.optim.milestones == [0.3, 0.6, 0.9]


@pytest.mark.parametrize("over,msg", [
    ({"optim": {"lr": -0.1}}, r"learning rate \(optim.lr\) = -0.1 is not valid; it must be greater than 0"),
    ({"train": {"epochs": 0}}, "epochs = 0 is not valid; it must be at least 1"),
    ({"data": {"val_split": 1.5}}, r"must lie in \[0, 1\)"),
    ({"data": {"val_split": -0.1}}, r"must lie in \[0, 1\)"),
    ({"model": {"name": "vgg"}}, "valid models: keras-deep, keras-shallow"),
    ({"optim": {"name": "lbfgs"}}, "valid optimizers: rmsprop, sgd, adam, adamw, muon"),
    ({"optim": {"clipnorm": -1.0}}, "optim.clipnorm = -1.0 is not valid; it must be 0 \\(off\\) or a positive number"),
    ({"optim": {"global_clipnorm": float("nan")}}, "optim.global_clipnorm: nan is not valid; expected a finite number"),
    ({"optim": {"clipnorm": 1.0, "clipvalue": 0.5}},
     "optim.clipnorm = 1 and optim.clipvalue = 0.5 are not valid together: clip the gradients by one of"),
    # a misspelt name is answered with the one it was probably meant to be
    ({"model": {"name": "kerasdeep"}},
     "model = 'kerasdeep' is not valid \\(did you mean 'keras-deep'\\?\\); valid models"),
    ({"optim": {"schedule": "cosin"}}, "optim.schedule = 'cosin' is not valid \\(did you mean 'cosine'\\?\\); choose"),
    ({"train": {"precision": "bf61"}}, "train.precision = 'bf61' is not valid \\(did you mean 'bf16'\\?\\); choose"),
    ({"train": {"batch_size": "big"}}, "train.batch_size: 'big' is not valid; expected a whole number"),
    # a setting that may be left unset names its type in the same words
    ({"data": {"subset": 1.5}}, "data.subset: 1.5 is not valid; expected a whole number or null"),
    ({"train": {"prepare_ahead": 3}}, "train.prepare_ahead: 3 is not valid; expected true, false or null"),
    ({"train": {"class_weight": [1]}}, r"train.class_weight: \[1\] is not valid; expected text, a mapping or null"),
    ({"augment": {"width_shift_range": "wide"}}, "width_shift_range: 'wide' is not valid; expected a number or a list"),
    ({"train": {"device": "tpu"}}, "device = 'tpu' is not valid"),
    ({"data": {"classes": ["cat"]}}, r"data.classes = \['cat'\] is not valid; give two or more different class names"),
    ({"data": {"classes": ["cat", "dog", "cat"]}}, r"class names of the data, such as airplane,automobile,bird \(cat "
                                                  r"given twice\)"),
    ({"data": {"classes": ["", ""]}}, r"class names of the data, such as airplane,automobile,bird \(an empty name\)"),
    ({"augment": {"fill_mode": "mirror"}}, "fill_mode='mirror' is not valid; choose one of nearest, reflect, wrap, constant"),
    ({"augment": {"preset": "fancy"}}, "preset 'fancy' is not valid"),
    ({"optim": {"lr": float("inf")}}, "optim.lr: inf is not valid; expected a finite number"),
    ({"train": {"label_smoothing": float("nan")}}, "train.label_smoothing: nan is not valid; expected a finite"),
    ({"augment": {"zoom_range": [0.9, float("inf")]}}, "augment.zoom_range: .* is not valid"),
    ({"train": {"early_stopping": -1}}, "train.early_stopping = -1 is not valid; it must be 0 "),
    ({"train": {"early_stopping": 3}, "data": {"val_split": 0}},
     r"train.early_stopping = 3 is not valid; it watches val_loss, so it needs validation images: "
     r"set data.val_split \(--val-split\) above 0"),
    ({"train": {"early_stopping": 3, "early_stopping_monitor": "acc"}},
     "train.early_stopping_monitor = 'acc' is not valid; choose val_loss or val_accuracy"),
    ({"train": {"early_stopping": 3, "early_stopping_min_delta": -0.01}},
     "train.early_stopping_min_delta = -0.01 is not valid; it must be 0 or more"),
    ({"train": {"early_stopping_monitor": "val_accuracy"}}, "train.early_stopping_monitor = 'val_accuracy' is not "
     r"valid; it only applies with early stopping on: set train.early_stopping \(--early-stopping\)"),
    ({"train": {"early_stopping_min_delta": 0.01}}, "train.early_stopping_min_delta = 0.01 is not valid; it only"),
    ({"optim": {"plateau_patience": -1}}, "optim.plateau_patience = -1 is not valid; it must be 0 "),
    ({"optim": {"plateau_patience": 2, "plateau_factor": 1.0}}, r"optim.plateau_factor = 1.0 is not valid; it must "
     r"lie in \(0, 1\)"),
    ({"optim": {"plateau_patience": 2, "plateau_min_lr": -1e-5}}, "optim.plateau_min_lr = -1e-05 is not valid"),
    ({"optim": {"plateau_factor": 0.5}}, "optim.plateau_factor = 0.5 is not valid; it only applies with plateau "
     r"cuts on: set optim.plateau_patience \(--reduce-lr-on-plateau\)"),
    ({"optim": {"plateau_patience": 2}, "data": {"val_split": 0}}, "optim.plateau_patience = 2 is not valid; it "
     "watches val_loss, so it needs validation images"),
    ({"model": {"init_from": " "}}, "model.init_from = ' ' is not valid; give a run folder"),
    ({"train": {"freeze_epochs": -1}}, "train.freeze_epochs = -1 is not valid; it must be 0 "),
    ({"train": {"freeze_epochs": 2, "cuda_graph": True}}, "a CUDA graph fixes which parameters train, so it cannot "
     "unfreeze the model after train.freeze_epochs = 2"),
    ({"optim": {"plateau_patience": 2, "plateau_monitor": "val_acc"}},
     "optim.plateau_monitor = 'val_acc' is not valid \\(did you mean 'val_accuracy'\\?\\); choose val_loss or "
     "val_accuracy"),
    ({"optim": {"plateau_patience": 2, "plateau_min_delta": -0.5}},
     "optim.plateau_min_delta = -0.5 is not valid; it must be 0 or more"),
    ({"optim": {"plateau_patience": 2, "plateau_cooldown": -1}},
     "optim.plateau_cooldown = -1 is not valid; it must be 0 or a number of epochs"),
    ({"optim": {"plateau_cooldown": 2}}, "optim.plateau_cooldown = 2 is not valid; it only applies with plateau cuts"),
    ({"optim": {"plateau_monitor": "val_accuracy"}}, "optim.plateau_monitor = 'val_accuracy' is not valid; it only"),
    ({"optim": {"plateau_patience": 2, "plateau_monitor": "val_accuracy"}, "data": {"val_split": 0}},
     "optim.plateau_patience = 2 is not valid; it watches val_accuracy, so it needs validation images"),
    ({"optim": {"plateau_patience": 2}, "train": {"cuda_graph": True}}, "a CUDA graph bakes in the learning rate, "
     "so it cannot cut it on a plateau"),
    ({"train": {"early_stopping": 3, "lookahead_every": 5}}, "a run with lookahead ends on its slow weights"),
    ({"optim": {"schedule": "step", "milestones": [0.75, 0.5]}}, r"optim.milestones = \[0.75, 0.5\] is not valid; "
     "give fractions of all steps in increasing order"),
    ({"optim": {"schedule": "step", "milestones": [0.5, 1.0]}}, "each strictly between 0 and 1"),
    ({"optim": {"schedule": "step", "milestones": []}}, r"optim.milestones = \[\] is not valid"),
    ({"optim": {"schedule": "step", "gamma": 1.5}}, r"optim.gamma = 1.5 is not valid; it must lie in \(0, 1\)"),
    ({"optim": {"schedule": "cosine", "gamma": 0.5}}, "optim.gamma = 0.5 is not valid; it only applies with "
     "optim.schedule step"),
    ({"train": {"class_weight": "balance"}}, "train.class_weight = 'balance' is not valid; give balanced, a mapping"),
    ({"train": {"class_weight": {"cat": -1}}}, r"train.class_weight = \{'cat': -1.0\} is not valid; a class's weight"),
    ({"train": {"class_weight": {"cat": "heavy"}}}, "train.class_weight: .* is not valid; expected"),
    ({"train": {"class_weight": ["cat"]}}, "train.class_weight: .* is not valid; expected"),
    ({"train": {"class_weight": "cat=heavy"}}, "train.class_weight: 'cat=heavy': the weight 'heavy' is not a number"),
    ({"train": {"sampling": "oversample"}}, "train.sampling = 'oversample' is not valid; choose shuffle or balanced"),
    ({"train": {"sampling": "balanced", "class_weight": "balanced"}}, "train.sampling = 'balanced' is not valid; "
     "with train.class_weight set too, rare classes would be favoured twice over"),
    # each remaining check, so that none of them can break unseen into a traceback
    ({"train": {"deterministic": "maybe"}}, "train.deterministic: 'maybe' is not valid; expected true or false"),
    ({"optim": {"lr": True}}, "optim.lr: True is not valid; expected a number"),
    ({"data": {"data": ["a"]}}, r"data.data: \['a'\] is not valid; expected text or null"),
    ({"train": "x"}, "section 'train' must be a mapping of keys to values, found 'x'"),
    ({"data": {"subset": 0}}, "subset = 0 is not valid; it must be a positive number of images"),
    ({"data": {"split_seed": -1}}, r"data.split_seed = -1 is not valid; it must lie in \[0, 4294967295\], or be "
     "left out for the run's seed"),
    ({"data": {"split_seed": 3, "val_split": 0}}, "data.split_seed = 3 is not valid; it seeds --subset and the "
     r"validation split, and this config has neither: set data.val_split \(--val-split\) above 0"),
    ({"data": {"dataset": "cifar20"}}, r"dataset = 'cifar20' is not valid \(did you mean 'cifar10'\?\)"),
    ({"data": {"label_mode": "medium"}}, "data.label_mode = 'medium' is not valid; choose fine or coarse"),
    ({"data": {"test_split": 1}}, r"test split \(data.test_split\) = 1.0 is not valid; it must lie strictly between"),
    ({"data": {"labels": "x.csv"}}, r"data.labels = 'x.csv' is not valid; it names the classes of the images in "
     r"data.data \(--data\); give that too"),
    ({"optim": {"weight_decay": -1}}, "optim.weight_decay = -1.0 is not valid; it must be 0 or more"),
    ({"optim": {"momentum": 1.0}}, r"optim.momentum = 1.0 is not valid; it must lie in \[0, 1\)"),
    ({"optim": {"rho": 1.0}}, "optim.rho = 1.0 is not valid; it must lie strictly between 0 and 1"),
    ({"optim": {"muon_lr": 0}}, "optim.muon_lr = 0.0 is not valid; it must be greater than 0"),
    ({"optim": {"muon_momentum": 1}}, r"optim.muon_momentum = 1.0 is not valid; it must lie in \[0, 1\)"),
    ({"optim": {"ns_steps": 0}}, r"optim.ns_steps = 0 is not valid; it must lie in \[1, 20\]"),
    ({"optim": {"norm_bias_lr_scale": 0}}, "optim.norm_bias_lr_scale = 0.0 is not valid; it must be greater than 0"),
    ({"optim": {"warmup_frac": 1.5}}, r"optim.warmup_frac = 1.5 is not valid; it must lie in \[0, 1\]"),
    ({"train": {"class_weight": "=2"}}, "train.class_weight: '=2' is not valid; give balanced, none or NAME=WEIGHT"),
    ({"train": {"batch_size": 0}}, "batch size = 0 is not valid; it must be at least 1"),
    ({"train": {"label_smoothing": 1.0}}, r"train.label_smoothing = 1.0 is not valid; it must lie in \[0, 1\)"),
    ({"train": {"tta": "flips"}}, r"train.tta = 'flips' is not valid \(did you mean 'flip'\?\)"),
    ({"train": {"lookahead_every": -1}}, r"train.lookahead_every = -1 is not valid; it must be 0 \(off\) or a number"),
    ({"train": {"lookahead_every": 5, "lookahead_decay": 1.0}}, r"train.lookahead_decay = 1.0 is not valid; it must "
     r"lie in \[0, 1\)"),
    ({"train": {"lookahead_decay": 0.5}}, "train.lookahead_decay = 0.5 is not valid; it only applies with "
     "lookahead on"),
    ({"train": {"select_fraction": 0}}, r"train.select_fraction = 0.0 is not valid; it must lie in \(0, 1\]"),
    ({"train": {"select_fraction": 0.5, "select_model": "tiny"}}, "train.select_model = 'tiny' is not valid; valid "
     "models: keras-deep"),
    ({"train": {"select_backward_every": 0}}, "train.select_backward_every = 0 is not valid; it must be at least 1"),
    ({"train": {"teacher": "r", "distill_weight": 2}}, r"train.distill_weight = 2.0 is not valid; it must lie in "
     r"\[0, 1\]"),
    ({"train": {"teacher": "r", "distill_temperature": 0}}, "train.distill_temperature = 0.0 is not valid; it must "
     "be a number above 0"),
    ({"train": {"threads": 0}}, "threads = 0 is not valid; it must be at least 1"),
    ({"train": {"compile_mode": "max-autotune"}}, "train.compile_mode = 'max-autotune' is not valid; it takes effect "
     "only with train.compile: true"),
    ({"train": {"runs": 0}}, "runs = 0 is not valid; it must be at least 1"),
    ({"augment": {"mixup": -0.2}}, r"augment.mixup = -0.2 is not valid; it is the alpha of a Beta\(alpha, alpha\)"),
    ({"augment": {"cutmix": float("nan")}}, "augment.cutmix: nan is not valid; expected a finite number"),
    ({"augment": {"cutmix": 1.0}, "train": {"cuda_graph": True}}, "train.cuda_graph = True is not valid; a CUDA "
     "graph fixes the step's images and labels at capture, and MixUp and CutMix"),
])
def test_invalid_values(over, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve_config(overrides=over)


def test_class_weight_from_yaml_toml_or_flags_and_back(tmp_path):
    """A mapping's keys become text (YAML's 0: is class index 0), its weights numbers; 'none'
    is no weighting; the saved config reads back to the same."""
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  class_weight: {cat: 2, 0: 0.5}\n")
    cfg = resolve_config(file=f)
    assert cfg.train.class_weight == {"cat": 2.0, "0": 0.5}
    save_config(cfg, tmp_path / "config.yaml")
    assert load_run_config(tmp_path / "config.yaml") == cfg
    t = tmp_path / "c.toml"
    t.write_text('[train]\nclass_weight = "balanced"\n')
    assert resolve_config(file=t).train.class_weight == "balanced"
    assert resolve_config(file=f, overrides={"train": {"class_weight": "none"}}).train.class_weight is None
    # the flag's text form, as a file or a sweep may give it
    assert resolve_config(overrides={"train": {"class_weight": "cat=2, dog=0.5"}}).train.class_weight == \
        {"cat": 2.0, "dog": 0.5}


def test_unknown_recipe_and_keys(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("unknown recipe 'fastest' (did you mean 'fast'?); valid recipes: "
                                                    "keras-book")):
        resolve_config("fastest")
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=re.escape("unknown key 'train.epoch' (did you mean 'epochs'?); valid keys "
                                                    "in 'train': epochs")):
        resolve_config(file=f)
    f.write_text("trainer:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown section 'trainer' \\(did you mean 'train'\\?\\)"):
        resolve_config(file=f)
    # a key put in the wrong section is named with the section it belongs to (or sections, where several have it)
    f.write_text("train:\n  lr: 0.01\n")
    with pytest.raises(ConfigError, match=re.escape("unknown key 'train.lr' (lr is set in another section: "
                                                    "'optim.lr'); valid keys in 'train': epochs")):
        resolve_config(file=f)
    f.write_text("train:\n  name: sgd\n")
    with pytest.raises(ConfigError, match=re.escape("(name is set in another section: 'model.name' or 'optim.name')")):
        resolve_config(file=f)
    # a key written with no section at all (as a flat option name) is named with its section, as is a flag's alias
    for text, hint in (
            ("epochs: 3\n", "('epochs' is the key train.epochs: put it inside section 'train')"),
            ("batch-size = 64\n", "('batch-size' is the key train.batch_size: put it inside section 'train')"),
            ("optimizer: adam\n", "('optimizer' is the key optim.name: put it inside section 'optim')")):
        g = tmp_path / ("c.toml" if "=" in text else "c.yaml")
        g.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(f"unknown section '{text.split()[0].rstrip(':')}' {hint}; "
                                                        "valid sections: recipe, data")):
            resolve_config(file=g)


def test_syntax_errors_name_the_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 3\n  batch_size: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML syntax error at line 4"):
        resolve_config(file=f)
    t = tmp_path / "c.toml"
    t.write_text("[train]\nepochs = = 3\n")
    with pytest.raises(ConfigError, match="TOML syntax error.*line 2"):
        resolve_config(file=t)
    (tmp_path / "c.ini").write_text("[train]\n")
    with pytest.raises(ConfigError, match="must end in .yaml, .yml or .toml"):
        resolve_config(file=tmp_path / "c.ini")
    f.write_bytes("train:\n  out: caf\u00e9\n".encode("latin-1"))  # saved in another encoding than UTF-8
    with pytest.raises(ConfigError, match=r"c.yaml' is not UTF-8 text \(byte 0xe9 at offset 17\); save it as UTF-8"):
        resolve_config(file=f)
    f.write_text("- train\n- epochs: 3\n")  # a list, where the sections must be named
    with pytest.raises(ConfigError, match=r"c.yaml' must hold a mapping of sections, found list"):
        resolve_config(file=f)


@pytest.mark.parametrize("text, msg", [
    ("train:\n  epochs: 2\n  seed: 1\n  epochs: 3\n", "line 4, column 3: key 'epochs' is given twice (first at line 2)"),
    ("train: {epochs: 2}\nmodel: {name: keras-deep}\ntrain: {seed: 3}\n",
     "line 3, column 1: key 'train' is given twice (first at line 1)"),
    ("? [a, b]\n: 1\n", "found unhashable key"),
])
def test_a_yaml_key_given_twice_is_refused(tmp_path, text, msg):
    """PyYAML keeps the last of two equal keys; a config file must not lose a value silently."""
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        resolve_config(file=f)
    assert msg in str(e.value)
    f.write_text("train:\n  epochs: 2\nmodel:\n  name: keras-shallow\n  # epochs: 3\n")
    assert resolve_config(file=f).train.epochs == 2


def test_make_config_takes_the_train_flags_names_and_every_other_key_by_its_own():
    from cifarlab.config import make_config

    f_cfg = make_config("keras-book", epochs=3, model="speednet-wide", optimizer="adam", augment="crop-flip",
                        reduce_lr_on_plateau=2, rho=0.8, schedule="constant", data="x.tar.gz", val_split=0.1)
    nested = resolve_config("keras-book", overrides={
        "train": {"epochs": 3}, "model": {"name": "speednet-wide"}, "optim": {"name": "adam", "plateau_patience": 2,
                                                                              "rho": 0.8, "schedule": "constant"},
        "augment": {"preset": "crop-flip"}, "data": {"data": "x.tar.gz", "val_split": 0.1}})
    assert f_cfg == nested and f_cfg.recipe == "keras-book" and f_cfg.optim.plateau_patience == 2
    assert make_config(plateau_patience=2).optim.plateau_patience == 2  # the key's own name too


def test_make_config_puts_options_over_the_file_over_the_recipe(tmp_path):
    from cifarlab.config import make_config

    f = tmp_path / "c.yaml"
    f.write_text("recipe: keras-book-augmented\ntrain:\n  epochs: 3\n  batch_size: 64\n")
    cfg = make_config(file=f, epochs=5)
    assert (cfg.recipe, cfg.augment.preset, cfg.train.batch_size, cfg.train.epochs) == (
        "keras-book-augmented", "keras", 64, 5)


@pytest.mark.parametrize("options,msg", [
    ({"name": "adam"}, "unknown option 'name'; it is a key of model.name and optim.name: give model or optimizer"),
    ({"epoch": 5}, "unknown option 'epoch'; did you mean epochs?"),
    ({"qqqq": 1}, r"unknown option 'qqqq'; give a flag of 'cifarlab train' without its dashes \(lr, epochs, "
                  r"batch_size\) or a config key as section.key.*cifarlab.config.option_keys\(\) lists every option"),
    ({"epochs": "five"}, r"make_config\(\): train.epochs: 'five' is not valid; expected a whole number"),
    ({"epochs": 0}, "epochs = 0 is not valid; it must be at least 1"),
])
def test_make_config_names_a_bad_option(options, msg):
    from cifarlab.config import make_config

    with pytest.raises(ConfigError, match=msg):
        make_config(**options)


def test_every_train_flag_sets_the_config_key_of_its_name():
    """The CLI's train flags go through make_config's rule: a flag missing from the list, or one
    the rule does not know, would be silently ignored or refused."""
    import argparse

    from cifarlab import cli
    from cifarlab.config import OPTION_ALIASES, options_to_overrides

    sub = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    dests = {a.dest for a in sub.choices["train"]._actions} - {"help", "config", "recipe", "resume", "print_config",
                                                              "sweep", "lr_find", "lr_range", "lr_find_steps"}
    assert dests == set(cli._TRAIN_OPTIONS)
    set_keys = {(sec, key) for sec, keys in options_to_overrides(dict.fromkeys(dests, 1)).items() for key in keys}
    assert len(set_keys) == len(dests) and set(OPTION_ALIASES.values()) <= set_keys


def test_image_size_is_checked_and_saved_in_one_spelling(tmp_path):
    from cifarlab.config import parse_image_size, validate

    assert parse_image_size("64X48") == (64, 48) and parse_image_size(" 32 ") == (32, 32)
    assert parse_image_size("24,16") == (24, 16)
    cfg = resolve_config("keras-book", overrides={"data": {"image_size": "64X48"}})
    validate(cfg)
    assert cfg.data.image_size == "64x48"
    save_config(cfg, tmp_path / "config.yaml")
    assert load_run_config(tmp_path / "config.yaml").data.image_size == "64x48"
    for bad in ("0x32", "32x", "big", "-4"):
        with pytest.raises(ConfigError, match=f"image size \\(data.image_size\\) '{bad}' is not valid; expected HxW"):
            validate(resolve_config("keras-book", overrides={"data": {"image_size": bad}}))


def test_unused_settings_names_what_the_choices_ignore():
    """Options another optimizer, schedule or augmentation preset reads are named, one note per
    choice; what the choices read, and defaults, are not."""
    from cifarlab.config import unused_settings

    def notes(**over):
        return unused_settings(resolve_config("keras-book", overrides=over))

    assert notes() == []
    assert notes(optim={"momentum": 0.9, "centered": True}) == []  # rmsprop's own
    assert notes(optim={"name": "sgd", "beta2": 0.99, "ns_steps": 5, "eps": 1e-8}) == [
        "sgd does not use optim.beta2 = 0.99, optim.eps = 1e-08, optim.ns_steps = 5 (options of other optimizers, "
        "from the recipe or given; ignored)"]
    assert notes(augment={"preset": "keras", "cutout": 8}) == [
        "the keras augmentation preset does not use augment.cutout = 8 (options of other presets, from the recipe "
        "or given; ignored)"]
    assert notes(augment={"preset": "crop-flip", "rotation_range": 10.0, "crop_padding": 2}) == [
        "the crop-flip augmentation preset does not use augment.rotation_range = 10.0 (options of other presets, "
        "from the recipe or given; ignored)"]
    assert notes(augment={"rotation_range": 10.0}) == []  # "none" refined by Keras' fields


def test_every_recipe_reads_all_it_sets_and_a_swap_is_noted():
    """The notes are left for swaps: every recipe as it stands reads what it sets; swapping
    fast's optimizer, schedule and preset names each of fast's settings left behind."""
    from cifarlab.config import unused_settings
    from cifarlab.recipes import RECIPES

    for name in RECIPES:
        assert unused_settings(resolve_config(name)) == [], name
    swapped = resolve_config("fast", overrides={"optim": {"name": "adamw", "schedule": "constant"},
                                                "augment": {"preset": "none"}})
    assert [n.split(" (")[0] for n in unused_settings(swapped)] == [
        "adamw does not use optim.momentum = 0.85, optim.nesterov = True",
        "the constant schedule does not use optim.final_lr_frac = 0.07, optim.start_lr_frac = 0.2, "
        "optim.warmup_frac = 0.23",
        "the none augmentation preset does not use augment.alternating_flip = True, augment.crop_padding = 2"]
    keras_deep = resolve_config("fast", overrides={"model": {"name": "keras-deep"}})
    assert unused_settings(keras_deep) == [
        "keras-deep has no whitening layer, so train.whiten_bias_epochs = 3 does nothing (an option of the speednet "
        "models; ignored)",
        "keras-deep has no normalisation layer, so optim.norm_bias_lr_scale = 64.0 does nothing under sgd (it scales "
        "the lr of norm layers' biases; with muon, of every 1-D tensor; ignored)"]
    # muon scales every 1-D tensor, keras-deep's biases among them; resnet20 has batch norms
    assert not [n for n in unused_settings(resolve_config("fast-muon", overrides={"model": {"name": "keras-deep"}}))
                if "norm_bias_lr_scale" in n]
    assert unused_settings(resolve_config("fast", overrides={"model": {"name": "resnet20"}})) == [
        "resnet20 has no whitening layer, so train.whiten_bias_epochs = 3 does nothing (an option of the speednet "
        "models; ignored)"]
    # nor does a CUDA graph refuse it there, as it does for a model whose whitening bias stops training
    assert resolve_config("fast", overrides={"model": {"name": "keras-deep"}, "optim": {"schedule": "constant"},
                                             "train": {"cuda_graph": True}}).train.cuda_graph


def test_a_preset_writes_its_settings_into_the_config_and_reads_back_the_same(tmp_path):
    """Under a preset, the fields left at their defaults take the preset's values, so config.yaml
    shows what trains; a value given refines it; the saved config resolves to itself and builds
    the augmenter the preset built before, as does a config saved before the preset was written
    out (its fields at their defaults)."""
    from cifarlab.augment import KERAS_NOTEBOOK, augmenter_from_config
    from cifarlab.config import AugmentConfig, config_yaml, make_config

    cfg = make_config("keras-book", augment="keras", rotation_range=15)
    assert {k: getattr(cfg.augment, k) for k in KERAS_NOTEBOOK} == {**KERAS_NOTEBOOK, "rotation_range": 15.0}
    f = tmp_path / "c.yaml"
    f.write_text(config_yaml(cfg))
    assert resolve_config(file=f) == cfg
    assert augmenter_from_config(cfg.augment) == augmenter_from_config(AugmentConfig(preset="keras", rotation_range=15))
    old = tmp_path / "old.yaml"  # a run folder's config.yaml from before: the preset's fields at their defaults
    save_config(resolve_config("keras-book"), old)
    old.write_text(old.read_text().replace("preset: none", "preset: keras"))
    notebook = augmenter_from_config(make_config("keras-book", augment="keras").augment)
    assert augmenter_from_config(load_run_config(old).augment) == notebook
    assert augmenter_from_config(resolve_config(file=old).augment) == notebook  # --config of it, as before
    assert make_config("keras-book", augment="crop-flip").augment.crop_padding == 4
    assert make_config("fast").augment.crop_padding == 2  # a recipe's own value stays


@pytest.mark.parametrize("given, said", [
    ({"preset": "keras", "horizontal_flip": False},
     "augment.horizontal_flip = False cannot switch off the keras preset's horizontal_flip = True: under a preset a "
     "setting at its default keeps the preset's; give preset none with the rest of the notebook's settings "
     "\\(rotation_range: 40.0, width_shift_range: 0.2, height_shift_range: 0.2, zoom_range: 0.2\\)"),
    ({"preset": "keras", "rotation_range": 0, "zoom_range": 0.0, "width_shift_range": 0.1},
     "augment.rotation_range = 0.0, augment.zoom_range = 0.0 cannot switch off the keras preset's rotation_range = "
     "40.0, zoom_range = 0.2: .* \\(height_shift_range: 0.2, horizontal_flip: true\\)"),
    ({"preset": "crop-flip", "crop_padding": 0},
     "augment.crop_padding = 0 cannot switch off the crop-flip preset's crop_padding = 4: .*for random flips alone, "
     "give preset none with horizontal_flip: true"),
])
def test_a_setting_at_its_default_cannot_switch_a_presets_off_and_is_refused(tmp_path, given, said):
    """Where a field at its default would leave the preset's value, giving it is refused with the
    way to get it, from a file and from flags alike, rather than silently ignored."""
    from cifarlab.config import make_config

    f = tmp_path / "c.yaml"
    f.write_text("augment: {" + ", ".join(f"{k}: {str(v).lower()}" for k, v in given.items()) + "}\n")
    with pytest.raises(ConfigError, match=f"config file '{f}': {said}"):
        resolve_config(file=f)
    flat = {("augment" if k == "preset" else k): v for k, v in given.items()}
    with pytest.raises(ConfigError, match=f"make_config\\(\\): {said}"):
        make_config("keras-book", **flat)


def test_a_preset_chosen_later_takes_over_the_fields_an_earlier_file_left_at_their_defaults(tmp_path):
    """A file written from another recipe holds every augment key; a flag that picks the keras
    preset on top of it gets the notebook's settings, not a refusal (a later setting wins)."""
    from cifarlab.augment import KERAS_NOTEBOOK
    from cifarlab.config import config_yaml

    f = tmp_path / "fast.yaml"
    f.write_text(config_yaml(resolve_config("fast")))
    cfg = resolve_config(file=f, overrides={"augment": {"preset": "keras"}})
    assert {k: getattr(cfg.augment, k) for k in KERAS_NOTEBOOK} == KERAS_NOTEBOOK
