"""The config boundary: every user mistake is one clear error naming the key path and value."""

from pathlib import Path

import pytest

from gemini_core import config as config_lib
from gemini_core.errors import UserError
from gemini_core.experiment import load_experiment, split_spec
from gemini_core.train import trainer

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "experiments" / "quickstart.py")
ROOT = "--config.data.root=/data/corpus"


def load(*overrides, spec=QUICKSTART):
    return load_experiment(spec, [ROOT, *overrides])


def test_quickstart_loads_into_frozen_typed_config():
    exp = load()
    cfg = exp.config
    assert isinstance(cfg, config_lib.ExperimentConfig)
    assert cfg.model.vocab_size == cfg.data.tokenizer.vocab_size == 4096
    assert cfg.data.domains == config_lib.DEFAULT_DOMAINS
    assert exp.overrides == {"data.root": "/data/corpus"}
    with pytest.raises(Exception):
        cfg.model.d_model = 3  # frozen


def test_overrides_use_ml_collections_semantics():
    exp = load("--config.train.steps=50", "--config.optimizer.lr=0.01",
               "--config.tracking.wandb=false", "--config.data.domains=('web','code')",
               "--config.mixture.stages.base.weights={'web': 0.5, 'code': 0.5}",
               "--config.mixture.stages.anneal.weights={'web': 0.25, 'code': 0.75}")
    cfg = exp.config
    assert (cfg.train.steps, cfg.optimizer.lr, cfg.tracking.wandb) == (50, 0.01, False)
    assert cfg.data.domains == ("web", "code")
    assert dict(cfg.mixture.stages["anneal"].weights) == {"web": 0.25, "code": 0.75}


def test_schema_defaults_can_be_overridden_even_if_the_file_omits_them():
    cfg = load("--config.data.max_epochs=2.5", "--config.model.rope_base=500000.0").config
    assert cfg.data.max_epochs == 2.5 and cfg.model.rope_base == 500000.0


@pytest.mark.parametrize("overrides, message", [
    (["--config.model.foo=1"], "config.model.foo: unknown key"),
    (["--config.trian.steps=1"], "config.trian: unknown key"),
    (["--config.train.steps=abc"], "config.train.steps=abc"),
    (["--config.train.steps"], "missing value"),
    (["--config.model.tie_embeddings=maybe"], "config.model.tie_embeddings"),
    (["--config.model.d_model=0"], "config.model.d_model=0: must be > 0"),
    (["--config.model.num_layers=-2"], "config.model.num_layers=-2: must be > 0"),
    (["--config.train.batch_size=0"], "config.train.batch_size=0: must be > 0"),
    (["--config.optimizer.lr=0"], "config.optimizer.lr=0.0: must be > 0"),
    (["--config.optimizer.lr=-0.1"], "config.optimizer.lr=-0.1: must be > 0"),
    (["--config.data.seq_len=-1"], "config.data.seq_len=-1: must be > 0"),
    (["--config.model.num_heads=5"], "config.model.num_heads=5: must divide config.model.d_model=128"),
    (["--config.model.num_kv_heads=3"], "config.model.num_kv_heads=3: must divide config.model.num_heads=4"),
    (["--config.data.on_bad_record=ignore"], "config.data.on_bad_record='ignore': must be one of error, skip"),
    (["--config.optimizer.schedule=linear"], "config.optimizer.schedule='linear'"),
    (["--config.mixture.stages.base.weights.web=-0.1"], "config.mixture.stages.base.weights.web=-0.1: weights must be non-negative"),
    (["--config.mixture.stages.base.weights.web=0.3"], "config.mixture.stages.base.weights: weights sum to 1.1"),
    (["--config.mixture.stages.anneal.start=0.0"], "start=0.0: stage starts must be strictly increasing"),
    (["--config.mixture.stages.anneal.start=1.0"], "config.mixture.stages.anneal.start=1.0: must be in [0, 1)"),
    (["--config.mixture.stages.base.start=0.1"], "config.mixture.stages.base.start=0.1: the first stage must start at 0.0"),
    (["--config.data.domains=('web','code')"], "config.mixture.stages.anneal.weights.books: unknown domain"),
    (["--config.model.attention=flash"], "config.model.attention='flash': must be one of auto, dense, blockwise, cudnn"),
    (["--config.model.remat=some"], "config.model.remat='some': must be one of none, full,"),
    (["--config.model.rope.method=yarn", "--config.model.rope.factor=4.0"], "config.model.rope.original_length=0: yarn needs"),
    (["--config.model.document_mask=True"], "config.model.document_mask: unknown key"),
    (["--config.optimizer.warmup_steps=600"], "config.optimizer.warmup_steps=600: must be below config.train.steps=600"),
])
def test_user_errors_name_key_path_and_value(overrides, message):
    with pytest.raises(UserError) as err:
        load(*overrides)
    assert message in str(err.value)


def test_weights_within_1e6_of_one_are_accepted():
    cfg = load("--config.mixture.stages.base.weights.web=0.2000005").config
    assert cfg.mixture.stages["base"].weights["web"] == pytest.approx(0.2000005)


def test_missing_required_field_and_unknown_section_key(tmp_path):
    exp_file = tmp_path / "bad.py"
    exp_file.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('q', {QUICKSTART!r})\n"
        "q = importlib.util.module_from_spec(spec); spec.loader.exec_module(q)\n"
        "def get_config(arg=None):\n"
        "    c = q.get_config()\n"
        "    if arg == 'nosteps':\n"
        "        del c.train['steps']\n"
        "    if arg == 'extra':\n"
        "        c.data.tokenizer.vocab = 5\n"
        "    return c\n")
    with pytest.raises(UserError, match=r"config\.train\.steps: missing required field \(int\)"):
        load(spec=f"{exp_file}:nosteps")
    with pytest.raises(UserError, match=r"config\.data\.tokenizer\.vocab: unknown key"):
        load(spec=f"{exp_file}:extra")


def test_data_root_is_required_to_train_but_not_to_plan(tmp_path):
    exp = load_experiment(QUICKSTART, [])  # a --dry-run plan reads no data
    with pytest.raises(UserError, match=r"config\.data\.root='': set it"):
        trainer.prepare(exp.config, tmp_path)
    assert not any(tmp_path.iterdir())


def test_broken_experiment_files_name_file_and_line(tmp_path):
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def get_config(arg=None):\n    return (\n")
    with pytest.raises(UserError, match=rf"{syntax}:\d+: SyntaxError"):
        load_experiment(str(syntax))
    raises = tmp_path / "raises.py"
    raises.write_text("def get_config(arg=None):\n    x = 1\n    return 1 / 0\n")
    with pytest.raises(UserError, match=rf"{raises}:3: get_config\(\) failed: ZeroDivisionError"):
        load_experiment(str(raises))
    with pytest.raises(UserError, match="experiment file not found"):
        load_experiment(str(tmp_path / "nope.py"))


def test_spec_argument_parsing():
    assert split_spec("experiments/pretrain.py:size=nano,d=64") == (
        Path("experiments/pretrain.py"), "size=nano,d=64")
    assert split_spec("experiments/quickstart.py") == (Path("experiments/quickstart.py"), None)
    with pytest.raises(UserError, match="experiment argument 'depth=3'"):
        load_experiment(str(REPO / "experiments/pretrain.py") + ":depth=3", [ROOT])
    with pytest.raises(UserError, match="size='giant'"):
        load_experiment(str(REPO / "experiments/pretrain.py") + ":size=giant", [ROOT])


@pytest.mark.parametrize("size", ["nano", "pro", "ultra"])
def test_pretrain_presets_validate_full_and_scaled(size):
    full = load(spec=str(REPO / "experiments/pretrain.py") + f":size={size}").config
    small = load(spec=str(REPO / "experiments/pretrain.py") + f":size={size},d=128").config
    assert full.model.d_model > small.model.d_model == 128
    assert small.model.num_heads * small.model.qk_dim == 128
    if size == "nano":
        assert full.model.num_kv_heads == small.model.num_kv_heads == 1  # multi-query
